"""Each logit loss and each pseudo-teacher owns its typed config section (``losses.<name>``,
``pseudo_teachers.<name>``): its values reach the loss, they are range-checked only when the run uses it, unknown
names and keys get a did-you-mean, and the flat keys of earlier versions still work (with a warning), in a
config and in the config.yaml of a run that version wrote, which still resumes with the same command."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_train import assert_same_weights, final_weights, make_cfg, train_rows, without_timing

from kdcache.config import Section, Valid, build_config, doc, from_dict, to_dict
from kdcache.errors import CacheMismatchError, ConfigError
from kdcache.train import TrainConfig, train
from kdcache.train.config import LEGACY_KEYS
from kdcache.train.losses import LOSSES, TOPK_SIGNALS, LossSettings, Targets, get_loss, loss_options, register_loss
from kdcache.train.pseudo_teachers import EMAConfig, PeersConfig, pseudo_teacher_options


def _problem(seed=0, n=10, V=24):
    g = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    student = 2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(teacher, -1)
    vals, ids = logp.topk(V, -1)  # k = V: the buckets are the full distributions
    return teacher, student, Targets(torch.zeros(n, dtype=torch.long), ids, vals, torch.full((n,), -math.inf, dtype=torch.float64))


def _jsd_definition(teacher, student, beta, T):
    """T^2 * generalized JSD summed over tokens, from its definition on float64 softmaxes (not kdcache's code)."""
    t, s = torch.softmax(teacher / T, -1), torch.softmax(student / T, -1)
    m = beta * t + (1 - beta) * s
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    return (beta * kl(t, m) + (1 - beta) * kl(s, m)).sum() * T**2


def check(cfg: TrainConfig) -> None:
    """What a run checks first (kdcache.train.loop): every loss's and pseudo-teacher's section by its registry."""
    loss_options(cfg)
    pseudo_teacher_options(cfg)


def _jsd_of(cfg: TrainConfig, teacher, student, tg, T=2.0):
    settings = LossSettings(temperature=T, alpha=1.0, tail="bucket", options=loss_options(cfg))
    return get_loss("jsd").fn(student, tg, settings)[0]


# ------------------------------------------------------------------------------------------------
# the value reaches the loss


def test_a_losses_section_reaches_the_loss_and_equals_the_dense_definition():
    teacher, student, tg = _problem()
    got = {}
    for beta in (0.2, 0.5, 0.8):
        cfg = build_config(TrainConfig, overrides=["loss=jsd", f"losses.jsd.beta={beta}"])
        got[beta] = _jsd_of(cfg, teacher, student, tg)
        want = _jsd_definition(teacher, student, beta, 2.0)
        assert abs(got[beta].item() - want.item()) <= 1e-9 * abs(want.item()), (beta, got[beta].item(), want.item())
    assert len({round(v.item(), 6) for v in got.values()}) == 3  # beta changes the value
    # no section: the loss's default (0.5)
    assert torch.allclose(_jsd_of(TrainConfig(loss="jsd"), teacher, student, tg), got[0.5], rtol=1e-12)


def test_a_stage_loss_reads_its_section_from_the_same_losses():
    cfg = build_config(TrainConfig, overrides=["loss=kd", "stages=[{steps: 0, loss: jsd}]", "losses.jsd.beta=0.25"])
    options = loss_options(cfg)
    assert set(options) == {"kd", "jsd"} and options["jsd"].beta == 0.25
    with pytest.raises(ConfigError, match=r"^losses.jsd.beta must be in \(0, 1\), got 0 "):
        check(build_config(TrainConfig, overrides=["stages=[{steps: 0, loss: jsd}]", "losses.jsd.beta=0"]))


def test_the_section_changes_what_the_run_trains(tiny_cache, tmp_path):
    """Through the trainer: the logged jsd of step 1 (same student, same batch) moves with losses.jsd.beta."""
    first = {}
    for beta in (0.2, 0.8):
        out = tmp_path / f"b{beta}"
        train(make_cfg(tiny_cache, out, loss="jsd", steps=1, losses={"jsd": {"beta": beta}}), progress=False)
        first[beta] = train_rows(out)[0]["jsd"]
    assert abs(first[0.2] - first[0.8]) > 1e-3 * abs(first[0.2]), first


def test_a_pseudo_teachers_section_reaches_it(tiny_cache):
    from kdcache.cache import open_cache
    from kdcache.train.pseudo_teachers import EMATeacher, PeerTeacher
    from kdcache.train.student import build_student

    cfg = make_cfg(tiny_cache, "unused", pseudo_teacher="peers", pseudo_teachers={"peers": {"count": 3, "top_k": 5}, "ema": {"decay": 0.7}})
    model, _ = build_student(cfg.student, open_cache(tiny_cache), seed=0)
    peers = PeerTeacher(cfg, model)
    assert len(peers.peers) == 2 and peers.options == PeersConfig(top_k=5, count=3) and peers.reads == ()
    assert EMATeacher(cfg, model).decay == 0.7  # built directly, an unused section still configures it
    assert pseudo_teacher_options(make_cfg(tiny_cache, "x", pseudo_teacher="ema")) == EMAConfig()


# ------------------------------------------------------------------------------------------------
# mistakes: one line, the full key, the likely intended name


@pytest.mark.parametrize("overrides, message", [
    (["loss=jsd", "losses.jsd.beta=1.5"], r"^losses.jsd.beta must be in \(0, 1\), got 1.5 \(fix it in the config file or with --set losses.jsd.beta=...\)$"),
    (["loss=skl", "losses.skl.skew=1"], r"^losses.skl.skew must be in \[0, 1\), got 1 "),
    (["loss=tfkd", "losses.tfkd.correct_prob=0"], r"^losses.tfkd.correct_prob must be in \(0, 1\), got 0 "),
    (["pseudo_teacher=ema", "pseudo_teachers.ema.decay=1"], r"^pseudo_teachers.ema.decay must be in \[0, 1\), got 1 "),
    (["pseudo_teacher=augment", "pseudo_teachers.augment.top_k=0"], r"^pseudo_teachers.augment.top_k must be positive, got 0 "),
    (["losses.jsdd.beta=0.3"], r"^unknown loss losses.jsdd; did you mean losses.jsd\? valid losses: ce, .*tfkd, tv$"),
    (["losses.jsd.btea=0.3"], r"^unknown config key losses.jsd.btea \(did you mean losses.jsd.beta\?\)"),
    (["loss=jsd", "losses.jsd.btea=0.3"], r"^unknown config key losses.jsd.btea \(did you mean losses.jsd.beta\?\)"),
    (["pseudo_teachers.emma.decay=0.3"], r"^unknown pseudo-teacher pseudo_teachers.emma; did you mean pseudo_teachers.ema\?"),
    (["pseudo_teachers.peers.cuont=3"], r"^unknown config key pseudo_teachers.peers.cuont \(did you mean pseudo_teachers.peers.count\?\)"),
    (["pseudo_teacher=emaa"], r"^unknown pseudo_teacher 'emaa'; did you mean ema\? valid: none, augment, dropout, ema, peers$"),
    (["losses.jsd=0.3"], r"^losses.jsd must be a mapping of its keys, got 0.3"),
    (["loss=jsd", "losses.jsd.beta=abc"], r"^losses.jsd.beta: expected a number, got 'abc'$"),
])
def test_a_bad_section_is_one_line_naming_its_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        check(build_config(TrainConfig, overrides=overrides))
    assert "\n" not in str(exc.value) and re.search(message, str(exc.value)), str(exc.value)


def test_a_run_refuses_a_bad_section_before_its_run_directory(tiny_cache, tmp_path):
    for kw in ({"loss": "jsd", "losses": {"jsd": {"beta": 2.0}}}, {"losses": {"jsdd": {}}},
               {"pseudo_teacher": "augment", "pseudo_teachers": {"augment": {"prob": 0.0}}}):
        with pytest.raises(ConfigError, match="losses.jsd.beta must be|unknown loss losses.jsdd|pseudo_teachers.augment.prob must be"):
            train(make_cfg(tiny_cache, tmp_path / "r", **kw), progress=False)
        assert not (tmp_path / "r").exists()


def test_an_unused_section_is_checked_for_names_and_keys_not_values():
    cfg = build_config(TrainConfig, overrides=["loss=kd", "losses.jsd.beta=5", "pseudo_teachers.ema.decay=7"])
    check(cfg)  # kd and no pseudo-teacher: neither value is parsed
    assert loss_options(cfg) == {"kd": LOSSES["kd"].config()} and pseudo_teacher_options(cfg) is None


def test_a_loss_with_a_parameter_is_one_registered_function(tmp_path):
    """The requirement itself: a new loss with a parameter needs no edit elsewhere: its section is parsed,
    range-checked, listed by `kdcache fields train`, and handed to it."""

    @dataclass
    class ScaledConfig(Section):
        factor: float = doc("How much to scale forward KL by.", 2.0, valid=Valid(0, 10, lo_open=True))

    def scaled(logits, targets, settings):
        loss, metrics = get_loss("fkl").fn(logits, targets, settings)
        return settings.options_for("scaled-test").factor * loss, metrics

    register_loss("scaled-test", TOPK_SIGNALS, "scaled forward KL (test)", ScaledConfig)(scaled)
    try:
        teacher, student, tg = _problem()
        cfg = build_config(TrainConfig, overrides=["loss=scaled-test", "losses.scaled-test.factor=3"])
        value = get_loss("scaled-test").fn(student, tg, LossSettings(alpha=1.0, options=loss_options(cfg)))[0]
        plain = get_loss("fkl").fn(student, tg, LossSettings(alpha=1.0))[0]
        assert torch.allclose(value, 3 * plain)
        with pytest.raises(ConfigError, match=r"^losses.scaled-test.factor must be in \(0, 10\], got 11 "):
            check(build_config(TrainConfig, overrides=["loss=scaled-test", "losses.scaled-test.factor=11"]))
        from kdcache.cli import main

        shown = CliRunner().invoke(main, ["fields", "train"]).output
        assert any(line.split()[:2] == ["losses.scaled-test.factor", "2"] and "Must be in (0, 10]." in line for line in shown.splitlines())
    finally:
        LOSSES.pop("scaled-test")


def test_fields_lists_every_loss_and_pseudo_teacher_key():
    from kdcache.cli import main

    result = CliRunner().invoke(main, ["fields", "train"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for key, default, valid in [("losses.jsd.beta", "0.5", "in (0, 1)"), ("losses.skl.skew", "0.1", "in [0, 1)"),
                                ("losses.srkl.skew", "0.1", "in [0, 1)"), ("losses.tfkd.correct_prob", "0.9", "in (0, 1)"),
                                ("pseudo_teachers.ema.decay", "0.99", "in [0, 1)"), ("pseudo_teachers.augment.prob", "0.1", "in (0, 1)"),
                                ("pseudo_teachers.peers.count", "2", "at least 2"), ("pseudo_teachers.peers.teacher_weight", "0", "in [0, 1]"),
                                ("pseudo_teachers.dropout.top_k", "64", "positive"), ("pseudo_teachers.ema.top_k", "64", "positive")]:
        assert key in rows and rows[key].split()[1] == default and f"Must be {valid}." in rows[key], rows.get(key)
    assert "beta" not in rows and "num_peers" not in rows and "pseudo_top_k" not in rows


# ------------------------------------------------------------------------------------------------
# the flat keys of earlier versions


@pytest.mark.parametrize("old, new", [
    ({"beta": 0.3}, {"losses": {"jsd": {"beta": 0.3}}}),
    ({"skew": 0.2}, {"losses": {"skl": {"skew": 0.2}, "srkl": {"skew": 0.2}}}),
    ({"correct_prob": 0.7}, {"losses": {"tfkd": {"correct_prob": 0.7}}}),
    ({"ema_decay": 0.5}, {"pseudo_teachers": {"ema": {"decay": 0.5}}}),
    ({"augment_prob": 0.2}, {"pseudo_teachers": {"augment": {"prob": 0.2}}}),
    ({"num_peers": 3, "peer_teacher_weight": 0.5}, {"pseudo_teachers": {"peers": {"count": 3, "teacher_weight": 0.5}}}),
    ({"pseudo_teacher": "dropout", "pseudo_top_k": 8}, {"pseudo_teacher": "dropout", "pseudo_teachers": {"dropout": {"top_k": 8}}}),
    ({"pseudo_top_k": 8}, {}),  # no pseudo-teacher: it never had an effect
])
def test_a_flat_key_still_works_with_one_warning(old, new, caplog, tmp_path):
    for how in ("set", "yaml"):
        caplog.clear()
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"train": old}))
        with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
            if how == "set":
                cfg = build_config(TrainConfig, overrides=[f"{k}={v}" for k, v in old.items()])
            else:
                cfg = build_config(TrainConfig, path, section="train")
        assert to_dict(cfg) == to_dict(TrainConfig(**new)), how
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage(), [r.getMessage() for r in warnings]
        for key in old:
            if key in LEGACY_KEYS:
                assert f"{key} is deprecated: use " in warnings[0].getMessage()
        for top, sections in ((k, v) for k, v in new.items() if k != "pseudo_teacher"):
            for name, fields in sections.items():
                assert all(f"{top}.{name}.{f}" in warnings[0].getMessage() for f in fields), warnings[0].getMessage()


def test_a_flat_key_in_the_demos_train_section_and_beside_its_new_key(caplog):
    from kdcache.cli.demo import DemoConfig

    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
        demo = build_config(DemoConfig, overrides=["train.beta=0.3", "train.loss=jsd"])
    assert demo.train.losses == {"jsd": {"beta": 0.3}}
    assert "train.beta is deprecated: use train.losses.jsd.beta" in caplog.text
    # the same value twice is fine; different values are refused in one line
    assert build_config(TrainConfig, overrides=["beta=0.3", "losses.jsd.beta=0.3"]).losses == {"jsd": {"beta": 0.3}}
    with pytest.raises(ConfigError, match=r"^beta \(0.3\) and losses.jsd.beta \(0.4\) disagree; beta is deprecated: drop it and keep losses.jsd.beta$"):
        build_config(TrainConfig, overrides=["beta=0.3", "losses.jsd.beta=0.4"])
    with pytest.raises(ConfigError, match=r"^skew \(0.3\) and losses.srkl.skew \(0.2\) disagree"):
        build_config(TrainConfig, overrides=["skew=0.3", "losses.srkl.skew=0.2"])
    # out of range through the old key: the error names the new key
    with pytest.raises(ConfigError, match=r"^losses.jsd.beta must be in \(0, 1\), got 1.5"):
        check(build_config(TrainConfig, overrides=["loss=jsd", "beta=1.5"]))


# ------------------------------------------------------------------------------------------------
# resuming a run whose config.yaml an earlier version wrote


OLD_DEFAULTS = {"beta": 0.5, "num_peers": 2, "peer_teacher_weight": 0.0, "ema_decay": 0.99, "augment_prob": 0.1, "pseudo_top_k": 64,
                "correct_prob": 0.9, "skew": 0.1}


def _as_the_old_version_wrote_it(saved, **flat):
    """config.yaml as kdcache before sections wrote it: every field, the loss parameters as flat keys."""
    data = yaml.safe_load(saved.read_text())
    assert data.pop("losses") is not None and data.pop("pseudo_teachers") is not None
    data.update({**OLD_DEFAULTS, **flat})
    saved.write_text("# written by kdcache 0.9.0\n" + yaml.safe_dump(data, sort_keys=False))


def test_a_run_written_with_the_flat_keys_resumes_with_the_same_command(tiny_cache, tmp_path, caplog):
    common = dict(loss="jsd", alpha=0.5, steps=4, save_every=2, min_lr_ratio=1.0, warmup_steps=1, losses={"jsd": {"beta": 0.3}})
    whole, out = tmp_path / "whole", tmp_path / "run"
    train(make_cfg(tiny_cache, whole, **common), progress=False)
    train(make_cfg(tiny_cache, out, **{**common, "steps": 2}), progress=False)
    _as_the_old_version_wrote_it(out / "config.yaml", beta=0.3)
    with caplog.at_level(logging.INFO):
        train(make_cfg(tiny_cache, out, **common), progress=False)  # the same command, no --resume
    assert "resumed from" in caplog.text and "deprecated" not in caplog.text  # the run's own file: no warning
    assert_same_weights(final_weights(whole), final_weights(out))
    assert [without_timing(r) for r in train_rows(whole)] == [without_timing(r) for r in train_rows(out)]
    assert "beta" not in yaml.safe_load((out / "config.yaml").read_text())  # rewritten in the new layout

    # a different value under the old key is a different run
    _as_the_old_version_wrote_it(out / "config.yaml", beta=0.6)
    with pytest.raises(CacheMismatchError, match=r"\(losses differ\)"):
        train(make_cfg(tiny_cache, out, **common), progress=False)


def test_a_section_at_its_defaults_or_for_an_unused_loss_is_the_same_run(tiny_cache, tmp_path):
    out = tmp_path / "run"
    common = dict(loss="skl", steps=2, save_every=1)
    train(make_cfg(tiny_cache, out, **common), progress=False)
    same = [{"skl": {"skew": 0.1}}, {"jsd": {"beta": 0.9}}, {"skl": {}, "tfkd": {"correct_prob": 0.5}}]
    for losses in same:  # each resumes at the end (the config check passes) instead of refusing
        train(make_cfg(tiny_cache, out, **common, losses=losses), progress=False)
    with pytest.raises(CacheMismatchError, match="losses differ"):
        train(make_cfg(tiny_cache, out, **common, losses={"skl": {"skew": 0.3}}), progress=False)


def test_the_saved_config_is_still_a_config(tiny_cache, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_cache, out, loss="jsd", steps=1, losses={"jsd": {"beta": 0.3}}, pseudo_teacher="ema",
                   pseudo_teachers={"ema": {"decay": 0.5, "top_k": 8}})
    train(cfg, progress=False)
    assert build_config(TrainConfig, out / "config.yaml") == cfg
    assert from_dict(TrainConfig, yaml.safe_load((out / "config.yaml").read_text())).pseudo_teachers == {"ema": {"decay": 0.5, "top_k": 8}}
