"""``python -m kdcache``: the same as the ``kdcache`` command."""

from kdcache.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
