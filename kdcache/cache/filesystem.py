"""Where a cache lives: a local folder (``pathlib.Path``, unchanged) or a prefix on an object store (fsspec).

A name with a URL scheme (``s3://bucket/prefix``, ``gs://bucket/prefix``) is a :class:`RemotePath`: the small part of
the ``pathlib`` API the cache code uses (``/``, ``name``, ``exists``, ``iterdir``, ``stat``, ``read_text``, ``open``,
``unlink``), served by fsspec (s3fs for ``s3://``, gcsfs for ``gs://``). Local names stay ``Path`` objects, so local
caches keep their exact behaviour; only the few operations an object store lacks branch on :func:`is_remote`:

- no rename: a shard is written straight to its final name; an object appears only once its upload completes (one PUT,
  or a multipart upload completed at close), and an upload cut short leaves nothing. The manifest, written last by
  one PUT, is still the commit point: an object it does not list is a stray the next run replaces.
- no fsync: a completed PUT is durable.
- no flock: the lock is an object created with a conditional write (``If-None-Match: *``, kdcache/cache/object_lock.py).

Credentials and endpoint come from the client's standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``; ``GOOGLE_APPLICATION_CREDENTIALS``), plus ``KDCACHE_STORAGE_OPTIONS``: a JSON
object passed to the fsspec file system as keyword arguments (e.g. ``{"endpoint_url": "http://minio:9000"}``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat as stat_mod
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import ConfigError

STORAGE_OPTIONS_ENV = "KDCACHE_STORAGE_OPTIONS"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
READ_BLOCK_BYTES = 8 << 20
"""fsspec's read-ahead block for shards: what one open remote file buffers, so a reader's memory stays a few blocks
whatever the shard size (s3fs's own default is 50 MiB)."""
S3_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 10, "retries": {"mode": "standard", "total_max_attempts": 3}}
"""botocore settings for s3:// (``config_kwargs`` in ``KDCACHE_STORAGE_OPTIONS`` overrides them key by key). With the
defaults (s3fs retries 5 times over botocore's own 5 attempts, 15 s read timeout) a cut network kept a command hanging
for many minutes; these bound one request to 3 attempts of at most 10 s each, so a cut ends the command within about a
minute or two, with one line, while a blip of a few seconds is still ridden out."""


def is_remote(path: object) -> bool:
    """True for a :class:`RemotePath` or a string with a URL scheme other than ``file://``."""
    if isinstance(path, RemotePath):
        return True
    m = _URL.match(path) if isinstance(path, str) else None
    return m is not None and m.group(1) != "file"


def as_path(path: str | os.PathLike) -> Path | RemotePath:
    """A cache location as the object the cache code works with."""
    if isinstance(path, RemotePath):
        return path
    if is_remote(path):
        return RemotePath(str(path))
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def storage_options() -> dict[str, Any]:
    """``KDCACHE_STORAGE_OPTIONS`` as a dict (empty when unset); a value that is not a JSON object is refused."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({exc.msg}); set it to a JSON object such as "
                          '\'{"endpoint_url": "http://127.0.0.1:9000"}\' or unset it') from None
    if not isinstance(options, dict):
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} must be a JSON object of file system options, not {type(options).__name__}")
    return options


def _drop_expect_continue(request, **_) -> None:
    """botocore asks for ``Expect: 100-continue`` on uploads, and aiohttp waits for the "100 Continue" with no timeout
    at all: a network cut mid-upload then hung generate forever (read_timeout never applies). Without the header the
    body goes at once and the response is bounded by read_timeout. The header is not signed, so removing it is safe."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _s3_session():
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register("before-send.s3", _drop_expect_continue)
    return session


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with datasets/pyarrow installs
        raise ConfigError(f"{protocol}:// needs fsspec: pip install fsspec {_PACKAGES.get(protocol, '')}".strip()) from None
    kwargs = json.loads(options)
    if protocol in ("s3", "s3a"):
        kwargs.setdefault("use_listings_cache", False)  # a listing must show what other writers did a moment ago
        kwargs["config_kwargs"] = {**S3_CLIENT_CONFIG, **kwargs.get("config_kwargs", {})}
        kwargs.setdefault("session", _s3_session())
    try:
        fs = fsspec.filesystem(protocol, **kwargs)
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # one pass of s3fs's own retry loop: botocore retries (above); the two would multiply
        return fs
    except (ImportError, ValueError) as exc:
        package = _PACKAGES.get(protocol)
        hint = f"install {package} (pip install {package})" if package else "use s3:// or gs://"
        raise ConfigError(f"cannot open {protocol}:// ({' '.join(str(exc).split())}); {hint}") from None


_NETWORK_ERRORS = {"HTTPClientError", "ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                   "ConnectionClosedError", "ClientConnectionError", "ServerTimeoutError", "ClientPayloadError", "FSTimeoutError"}


def is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is the client losing the store: a timeout or a dropped connection, as
    botocore, aiohttp or fsspec raise them; not a damaged object. Matched by class name, so the cache code needs none
    of those packages."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(c.__name__ in _NETWORK_ERRORS for c in type(exc).__mro__):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass(frozen=True)
class RemoteStat:
    st_size: int
    st_mode: int


class RemotePath:
    """One object or prefix on an object store, named by its URL (``s3://bucket/key``)."""

    def __init__(self, url: str):
        m = _URL.match(url)
        if m is None:
            raise ValueError(f"not a URL: {url!r}")
        self.protocol = m.group(1)
        self.key = m.group(2).strip("/")
        if not self.key:
            raise ConfigError(f"{url} names no bucket; pass {self.protocol}://BUCKET/PREFIX")

    # ---------------------------------------------------------------- naming
    @property
    def fs(self):
        return _filesystem(self.protocol, json.dumps(storage_options(), sort_keys=True))

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return RemotePath(f"{self.protocol}://{head}")

    def resolve(self) -> RemotePath:
        return self

    def is_absolute(self) -> bool:
        return True

    # ---------------------------------------------------------------- queries
    def exists(self) -> bool:
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.key))

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> list[RemotePath]:
        """The objects and sub-prefixes directly under this prefix (none when the prefix holds nothing: an object store
        has no empty folders)."""
        try:
            listed = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return []
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in listed}
        return [self / n for n in sorted(names) if n]

    def stat(self) -> RemoteStat:
        info = self.fs.info(self.key)  # FileNotFoundError when absent
        if info.get("type") == "directory":
            return RemoteStat(0, stat_mod.S_IFDIR | 0o755)
        return RemoteStat(int(info["size"]), stat_mod.S_IFREG | 0o644)

    def etag(self) -> str | None:
        """The object's version tag (S3 ETag, GCS generation), for a write that must not race another."""
        info = self.fs.info(self.key)
        return info.get("ETag") or info.get("etag") or info.get("generation")

    # ---------------------------------------------------------------- bytes
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: readers see the old object or the new one, never part of it."""
        self.fs.pipe_file(self.key, bytes(data))

    def create(self, data: bytes) -> None:
        """Create the object only if none exists (``If-None-Match: *``); FileExistsError when one does."""
        try:
            self.fs.pipe_file(self.key, bytes(data), mode="create")
        except FileExistsError:
            raise  # s3fs maps HTTP 412 to it
        except OSError as exc:  # other clients: the server's precondition message
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                raise FileExistsError(str(exc)) from None
            raise

    def replace_if_unchanged(self, data: bytes, etag: str) -> bool:
        """Overwrite the object only if it still has ``etag`` (S3 ``If-Match``); False if it changed meanwhile.
        Other stores raise NotImplementedError: the caller then leaves the object to the user."""
        if self.protocol not in ("s3", "s3a"):
            raise NotImplementedError(f"conditional overwrite on {self.protocol}://")
        try:
            self.fs.pipe_file(self.key, bytes(data), IfMatch=etag)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False
            raise
        return True

    def open(self, mode: str = "rb"):
        """A binary file: reads fetch ``READ_BLOCK_BYTES`` at a time; a write appears whole at ``close()`` and not at
        all after :func:`discard`."""
        if mode not in ("rb", "wb"):
            raise ValueError(f"RemotePath.open supports 'rb' and 'wb', not {mode!r}")
        if mode == "rb":
            return self.fs.open(self.key, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
        return self.fs.open(self.key, "wb")

    # ---------------------------------------------------------------- removal
    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        """This prefix and every object under it (or the one object of this name)."""
        try:
            self.fs.rm(self.key, recursive=True)
        except FileNotFoundError:
            pass

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no creating: an object store holds objects only."""

    def rmdir(self) -> None:
        """A prefix with no objects does not exist: nothing to remove."""

    # ---------------------------------------------------------------- folders
    def upload_tree(self, local: Path) -> None:
        """Put every file of the local folder ``local`` under this prefix that is missing or of another size there, so
        a copy an interrupted upload left half made is completed by the next call."""
        have = self.tree_sizes()
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = file.relative_to(local).as_posix()
            if have.get(rel) != file.stat().st_size:
                self.fs.put_file(str(file), f"{self.key}/{rel}")

    def tree_sizes(self) -> dict[str, int]:
        """Relative name -> size of every object under this prefix (empty when there is none)."""
        try:
            found = self.fs.find(self.key, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.key + "/"
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items()
                if name.startswith(prefix) and info.get("type") != "directory"}

    def download_tree(self, local: Path) -> None:
        """Every object under this prefix into the local folder ``local`` (created)."""
        local.mkdir(parents=True, exist_ok=True)
        for rel in sorted(self.tree_sizes()):
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f"{self.key}/{rel}", str(target))


def is_complete_tree(remote: RemotePath, local: Path) -> bool:
    """The remote prefix holds every file of ``local`` with its size (what :meth:`RemotePath.upload_tree` makes)."""
    have = remote.tree_sizes()
    return all(have.get(p.relative_to(local).as_posix()) == p.stat().st_size for p in local.rglob("*") if p.is_file())


def local_copy(remote: RemotePath, key: str) -> Path:
    """A local copy of a remote folder (a cache's tokenizer), kept under ``KDCACHE_HOME`` (default
    ``~/.cache/kdcache``) at ``remote/<key>``: ``key`` must change whenever the content does (the caller passes
    the tokenizer's fingerprint). Downloaded into a temporary folder and renamed, so a crash never leaves half."""
    home = Path(os.environ.get("KDCACHE_HOME", Path.home() / ".cache" / "kdcache")).expanduser()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{remote}-{key}")[-200:]
    target = home / "remote" / safe
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:40]}.", dir=target.parent))
    try:
        remote.download_tree(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # another process renamed its copy first: use that one
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
