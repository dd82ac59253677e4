import subprocess
import sys
from pathlib import Path

import pytest

from caiflow.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.constitution_path().is_file()


def test_overrides_and_storage(tmp_path):
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["generation.batch_size=3", "critique_revision.rounds=2"],
        storage=str(tmp_path),
    )
    assert cfg.generation.batch_size == 3
    assert cfg.critique_revision.rounds == 2
    assert cfg.run.storage == str(tmp_path)


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        build_config({"generation": {"batch_sise": 4}})
    msg = str(err.value)
    assert "generation.batch_sise" in msg and "batch_size" in msg and "Did you mean" in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="critique_revision.rounds"):
        build_config({"critique_revision": {"rounds": "many"}})
    with pytest.raises(ConfigError, match="critique_revision.rounds"):
        build_config({"critique_revision": {"rounds": 9}})  # 1-4


def test_bad_choice_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_config({"prompts": {"categorize": {"backend": "magic"}}})
    assert "prompts.categorize.backend" in str(err.value) and "endpoint" in str(err.value)


def test_old_role_keys_fold_into_roles():
    """preferences.feedback_model / evaluate.judge (and their endpoints) still work, as roles."""
    ep = {"base_url": "http://h:1/v1", "model": "m", "max_concurrency": 9}
    cfg = build_config(
        {"preferences": {"feedback_model": "base"}, "evaluate": {"judge": "openai", "openai": ep}}
    )
    assert cfg.roles.feedback.model == "base" and cfg.roles.feedback.endpoint is None
    assert cfg.roles.judge.endpoint.model == "m" and cfg.roles.judge.endpoint.max_concurrency == 9
    assert cfg.roles.teacher.model == "policy"
    old = build_config({"preferences": {"feedback_model": "openai", "openai": ep}})
    assert old.roles.feedback.endpoint == cfg.roles.judge.endpoint


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"prompts": {"categorize": {"backend": "openai", "openai": {"model": "m"}}}},
            "prompts.categorize.openai moved to the roles: put the endpoint under roles.teacher.endpoint",
        ),
        (
            {"evaluate": {"judge": "sl"}, "roles": {"judge": {"model": "base"}}},
            "evaluate.judge and roles.judge are both set: keep roles.judge and delete evaluate.judge.",
        ),
        (
            {"roles": {"teacher": {"model": "sl"}}},
            "roles.teacher.model 'sl' is not a stage this role can use",
        ),
        ({"roles": {"judge": {"model": ""}}}, "roles.judge has neither a model nor an endpoint"),
    ],
)
def test_role_mistakes_are_one_line_with_the_fix(data, message):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(notmap)


def test_fingerprint_dict_excludes_per_device_batches_devices_and_paths():
    a = build_config({}).fingerprint_dict()
    b = build_config(
        {
            "sft": {"per_device_batch_size": 2},
            "model": {"device": "cpu"},
            "run": {"storage": "/elsewhere"},
            "rl": {"per_device_batch_size": 4, "scoring_batch_size": 2},
        }
    ).fingerprint_dict()
    assert a == b
    c = build_config({"critique_revision": {"rounds": 2}}).fingerprint_dict()
    assert a != c
    # generation batches change a row's padding, and so its float rounding: fingerprinted
    assert build_config({"generation": {"batch_size": 2}}).fingerprint_dict() != a


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generation:\n  batch_sise: 4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "generation.batch_sise" in lines[0]
