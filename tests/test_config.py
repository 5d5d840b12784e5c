"""Tests for dicom_node.config: validation, error messages naming the field, and the shipped example."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
from pydantic import BaseModel

from dicom_node.config import (
    BUNDLED_MODELS_DIR,
    GENERAL_MODEL,
    AuditSettings,
    ConfigError,
    Destination,
    DispatchSettings,
    ExecutorSettings,
    HTTPSettings,
    InferenceSettings,
    JobSettings,
    LimitSettings,
    NodeConfig,
    NodeSettings,
    Notification,
    Peer,
    RetentionSettings,
    Rule,
    TLSSettings,
    VolumetrySettings,
    default_rules,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "node.example.toml"

DEST = """
[[destinations]]
name = "PACS"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.toml")
    return str(info.value)


# -- defaults ----------------------------------------------------------------------------------

def test_empty_file_gives_the_defaults() -> None:
    config = parse_config("")
    assert config == NodeConfig()
    assert config.node.ae_title == "DICOM_NODE"
    assert config.node.port == 11112
    assert config.node.uid_root is None
    assert config.peers == [] and config.destinations == []
    assert config.rules == default_rules()
    assert config.inference.models_dir == BUNDLED_MODELS_DIR
    assert config.dispatch.max_tries is None and config.dispatch.retry_for_s == 86400.0  # outlast a day's outage


def test_load_config_none_is_the_defaults() -> None:
    assert load_config(None) == NodeConfig()


def test_default_rules_are_valid_and_ordered() -> None:
    rules = default_rules()
    names = [r.name for r in rules]
    assert names == ["aahead-scout", "flair-3d", "flair-2d", "coronal-t2", "real-3d-t1", "t1-2d"]
    assert names.index("real-3d-t1") < names.index("t1-2d")
    assert {r.name: r.model for r in rules} == {
        "aahead-scout": "synth-t1-aahead-scout", "flair-3d": GENERAL_MODEL, "flair-2d": "synth-t1-flair",
        "coronal-t2": "synth-t1-cor-t2", "real-3d-t1": GENERAL_MODEL, "t1-2d": "synth-t1-t1-2d"}
    config = NodeConfig(rules=rules)
    assert config.inference.segmenter == "brainchop-aparc-aseg"
    assert config.models_for(rules[0]) == ["synth-t1-aahead-scout", "brainchop-aparc-aseg"]
    assert config.models_for(rules[4]) == ["brainchop-aparc-aseg"]  # the real T1: the segmenter only
    for rule in rules:
        assert rule.volumetry
        assert "ORIGINAL" in rule.image_type
    NodeConfig(rules=rules)  # passes the cross checks


# -- the shipped example -----------------------------------------------------------------------

def test_example_config_validates() -> None:
    config = load_config(EXAMPLE)
    assert config.destinations and config.peers


def test_example_rules_are_the_default_rules() -> None:
    assert load_config(EXAMPLE).rules == default_rules()


def test_example_settings_are_the_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.node == NodeSettings()
    assert config.limits == LimitSettings()
    assert config.inference == InferenceSettings()
    assert config.dispatch == DispatchSettings()
    assert config.jobs == JobSettings()
    assert config.tls == TLSSettings()
    assert config.volumetry == VolumetrySettings()
    assert config.audit == AuditSettings()
    assert config.notifications == []  # off unless configured
    assert config.retention == RetentionSettings()
    assert config.http == HTTPSettings()
    assert config.executor == ExecutorSettings()


@pytest.mark.parametrize(
    ("section", "model"),
    [("node", NodeSettings), ("limits", LimitSettings), ("peers", Peer), ("destinations", Destination), ("rules", Rule),
     ("inference", InferenceSettings), ("volumetry", VolumetrySettings), ("jobs", JobSettings),
     ("dispatch", DispatchSettings), ("tls", TLSSettings), ("audit", AuditSettings),
     ("notifications", Notification),
     ("retention", RetentionSettings), ("http", HTTPSettings), ("executor", ExecutorSettings)],
)
def test_example_documents_every_field(section: str, model: type[BaseModel]) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for field in model.model_fields:
        # a setting (possibly commented out) or a line of the field list in the section's comment
        pattern = rf"^#?\s*{re.escape(field)}\s*=|^#\s+{re.escape(field)}\s{{2,}}\S"
        assert re.search(pattern, text, flags=re.MULTILINE), f"[{section}] {field} is not in {EXAMPLE.name}"


# -- values ------------------------------------------------------------------------------------

def test_normative_table_is_read_at_load(tmp_path: Path) -> None:
    table = tmp_path / "norms.csv"
    table.write_text("code,age_min,age_max,sex,mean_ml,sd_ml\n17,50,60,F,3.7,0.4\n17,50,60,,3.8,0.4\n")
    config = parse_config(f'[volumetry]\nnormative_table = "{table}"\n', "node.toml")
    assert config.volumetry.normative_table == table
    table.write_text("code,age_min,age_max,sex,mean_ml,sd_ml\n17,50,60,F,3.7,0.4\n17,50,60,X,3.8,0.4\n")
    message = _error(f'[volumetry]\nnormative_table = "{table}"\n')
    assert "volumetry.normative_table" in message and "line 3" in message and "'X'" in message
    assert "cannot read normative table" in _error(f'[volumetry]\nnormative_table = "{tmp_path / "none.csv"}"\n')


@pytest.mark.parametrize(("row", "why"), [
    ("17,50,60,F,3.7,nan", "not nan or inf"),        # a NaN z-score in every SR
    ("17,50,60,F,inf,0.4", "not nan or inf"),
    ("17,50,60,F,-3.7,0.4", "must be above 0"),
    ("9999,50,60,F,3.7,0.4", "code 9999 is not a structure the node measures"),  # a row never used
])
def test_a_normative_row_that_cannot_score_is_refused(tmp_path: Path, row: str, why: str) -> None:
    table = tmp_path / "norms.csv"
    table.write_text(f"code,age_min,age_max,sex,mean_ml,sd_ml\n17,50,60,F,3.7,0.4\n{row}\n")
    message = _error(f'[volumetry]\nnormative_table = "{table}"\n')
    assert "line 3" in message and why in message


def test_valid_file_with_every_section(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        """
[node]
ae_title = " NODE1 "
port = 11113
data_dir = "/tmp/node-data"
uid_root = "1.2.826.0.1.3680043.10.999."

[[peers]]
ae_title = "SCANNER"
host = "10.0.0.5"

[[peers]]
ae_title = "PACS"
"""
        + DEST
        + """
[[destinations]]
name = "archive"
ae_title = "ARCH"
host = "10.0.0.6"
port = 11112
calling_ae_title = "NODE_OUT"

[[rules]]
name = "only-pacs"
series_description = "t1"
model = "m"
output_name = "sT1"
destinations = ["PACS"]

[[rules]]
name = "everywhere"
series_description = "t2"
model = "m"
output_name = "sT1T2"

[inference]
models_dir = "/opt/models"
providers = "cpu"
threads = 2
workers = 2

[dispatch]
max_tries = 3
backoff_initial_s = 1.5
""",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.node.ae_title == "NODE1"  # padding stripped
    assert config.node.uid_root == "1.2.826.0.1.3680043.10.999."
    assert config.node.data_dir == Path("/tmp/node-data")
    assert config.peers[1].host is None
    assert [d.name for d in config.destinations_for(config.rules[0])] == ["PACS"]
    assert [d.name for d in config.destinations_for(config.rules[1])] == ["PACS", "archive"]
    assert config.destination("archive").calling_ae_title == "NODE_OUT"
    with pytest.raises(KeyError):
        config.destination("nope")
    assert config.inference.models_dir == Path("/opt/models")
    assert config.dispatch.max_tries == 3 and config.dispatch.backoff_max_s == 900.0


def test_uid_root_gets_a_trailing_dot() -> None:
    assert parse_config('[node]\nuid_root = "1.2.3.4"').node.uid_root == "1.2.3.4."


@pytest.mark.parametrize("root", ["2.25", "1.2.840", "1.2.3"])
def test_a_uid_root_others_share_is_refused(root: str) -> None:
    # every series under it would be taken for the node's own output (2.25: every UUID-derived UID)
    message = _error(f'[node]\nuid_root = "{root}"')
    assert "node.uid_root" in message and "too short a UID root" in message


@pytest.mark.parametrize("root", ["1.2.abc", "3.1.2", "1.02.3", "1." + "2" * 40, ""])
def test_bad_uid_root_is_refused(root: str) -> None:
    message = _error(f'[node]\nuid_root = "{root}"')
    assert "node.uid_root" in message and "not a valid UID root" in message


@pytest.mark.parametrize("ae", ["", "   ", "A" * 17, "BAD\\\\AE", "ÄE"])
def test_bad_ae_titles_are_refused(ae: str) -> None:
    message = _error(f'[node]\nae_title = "{ae}"')
    assert "node.ae_title" in message and "AE title" in message


def test_bad_peer_ae_names_its_index() -> None:
    message = _error('[[peers]]\nae_title = "OK"\n[[peers]]\nae_title = "' + "X" * 20 + '"')
    assert "peers[1].ae_title" in message


def test_a_destinations_calling_ae_title_is_checked() -> None:
    """Found in review: a 17-character calling AE title passed `config check`, then every delivery raised."""
    message = _error('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
                     'calling_ae_title = "' + "X" * 17 + '"')
    assert "destinations[0].calling_ae_title" in message and "AE title" in message


def test_a_stow_url_holding_a_password_is_refused() -> None:
    """It would be printed by config check, logged at each retry and written to the audit trail."""
    message = _error('[[destinations]]\nname = "vna"\nprotocol = "stow-rs"\nurl = "https://me:secret@vna/dicomweb"')
    assert "destinations[0].url" in message and "password_file" in message
    assert "secret" not in message


def test_error_message_names_file_field_and_count() -> None:
    message = _error('[node]\nport = 70000\nlog_level = "LOUD"')
    assert message.startswith("node.toml: invalid configuration (2 problem(s))")
    assert "node.port" in message and "node.log_level" in message


def test_misspelt_key_is_refused() -> None:
    message = _error('[node]\naetitle = "X"')
    assert "node.aetitle" in message and "Extra inputs are not permitted" in message


def test_unknown_section_is_refused() -> None:
    assert "nodes" in _error('[nodes]\nport = 1')


def test_rule_with_unknown_destination() -> None:
    message = _error(DEST + '[[rules]]\nname = "r"\nseries_description = "t1"\nmodel = "m"\n'
                     'output_name = "x"\ndestinations = ["PACS2"]')
    assert "rules[0].destinations: unknown destination 'PACS2' (defined: PACS)" in message


def test_duplicate_destination_and_rule_names() -> None:
    assert "destinations[1].name: duplicate destination name 'PACS'" in _error(DEST + DEST)
    rule = '[[rules]]\nname = "r"\nseries_description = "t1"\nmodel = "m"\noutput_name = "x"\n'
    assert "rules[1].name: duplicate rule name 'r'" in _error(rule + rule)


def test_rule_validation() -> None:
    base = '[[rules]]\nname = "r"\noutput_name = "x"\n'
    assert "rules[0]: a rule with action 'synthesize' needs a model" in _error(base + 'series_description = "t1"')
    # a volumetry rule needs no model: the segmenter measures the real T1 ...
    assert parse_config(base + 'series_description = "t1"\naction = "volumetry"').rules[0].model is None
    # ... unless there is no segmenter
    assert "a volumetry rule needs a model when [inference] segmenter is empty" in _error(
        base + 'series_description = "t1"\naction = "volumetry"\n[inference]\nsegmenter = ""')
    assert "invalid regular expression" in _error(base + 'series_description = "t1("\nmodel = "m"')
    assert "rules[0].manufacturer" in _error(base + 'series_description = "t1"\nmodel = "m"\nmanufacturer = "[x"')
    assert "slice_thickness_min is larger" in _error(
        base + 'series_description = "t1"\nmodel = "m"\nslice_thickness_min = 5.0\nslice_thickness_max = 2.0'
    )
    assert "needs volumetry = true" in _error(
        base + 'series_description = "t1"\nmodel = "m"\naction = "volumetry"\nvolumetry = false'
    )
    assert "rules[0].mr_acquisition_type" in _error(
        base + 'series_description = "t1"\nmodel = "m"\nmr_acquisition_type = "4D"'
    )
    assert "rules[0].name" in _error('[[rules]]\nname = "bad name!"\noutput_name = "x"\n'
                                     'series_description = "t1"\nmodel = "m"')


def test_rule_defaults() -> None:
    rule = parse_config('[[rules]]\nname = "r"\nseries_description = "mprage"\naction = "volumetry"\n'
                        'model = "m"\noutput_name = "rT1"').rules[0]
    assert rule.volumetry and rule.destinations is None and rule.modality == "MR"
    assert rule.image_type == [] and rule.calling_ae == [] and rule.mr_acquisition_type is None


def test_retention_and_disk_watermark_defaults_and_checks() -> None:
    config = NodeConfig()
    # retention is on by default, conservatively: a month after delivery (README: Operations)
    assert config.retention.enabled and config.retention.delivered_days == 30 == config.retention.not_processed_days
    assert (config.limits.min_free_mb, config.limits.resume_free_mb) == (1024, 2048)
    assert "limits: resume_free_mb is smaller than min_free_mb" in _error("[limits]\nmin_free_mb = 500\n"
                                                                         "resume_free_mb = 100\n")
    assert "retention.delivered_days" in _error("[retention]\ndelivered_days = 0\n")
    off = parse_config("[retention]\nenabled = false\n[limits]\nmin_free_mb = 0\nresume_free_mb = 0\n")
    assert not off.retention.enabled and off.limits.min_free_mb == 0


def test_not_toml() -> None:
    message = _error("[node\nport = 1")
    assert message.startswith("node.toml: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")


def test_config_is_frozen() -> None:
    config = NodeConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.node.port = 1  # type: ignore[misc]


def test_a_rule_on_derived_images_is_refused() -> None:
    # the loop guard drops every DERIVED series before the rules: such a rule would never match
    with pytest.raises(ConfigError, match="image_type DERIVED never matches"):
        parse_config('[[rules]]\nname = "x"\nseries_description = "t1"\nmodel = "m"\noutput_name = "X"\n'
                     'image_type = ["derived"]')


def test_a_rules_calling_ae_titles_are_checked_and_stripped() -> None:
    rule = 'name = "x"\nseries_description = "t1"\nmodel = "m"\noutput_name = "X"\n'
    config = parse_config(f'[[rules]]\n{rule}calling_ae = [" MR1 "]')
    assert config.rules[0].calling_ae == ["MR1"]  # compared with the stripped calling AE title
    with pytest.raises(ConfigError, match="AE title"):
        parse_config(f'[[rules]]\n{rule}calling_ae = ["{"X" * 17}"]')


def test_relative_paths_are_taken_from_the_configuration_files_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths were taken from the folder a command ran in: `config check` in /etc/dicom-node passed, the
    unit (run in /) read other files. [audit] path stays under data_dir."""
    from dicom_node.config import load_config

    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "node.toml"
    (folder / "norms.csv").write_text("code,age_min,age_max,sex,mean_ml,sd_ml\n17,60,80,F,3.5,0.4\n")
    text = ('[node]\ndata_dir = "data"\n[tls]\ncert_file = "tls/node.pem"\nkey_file = "tls/node.key"\n'
            '[audit]\npath = "audit.jsonl"\n[[destinations]]\nname = "VNA"\nprotocol = "stow-rs"\n'
            'url = "https://vna.lan/dicom-web"\ntoken_file = "vna.token"\n'
            '[inference]\nmodels_dir = "/opt/models"\n[volumetry]\nnormative_table = "norms.csv"\n')
    # named through a link into a hidden folder, as a ConfigMap mounts it: the folder it is named in counts
    (folder / "..data").mkdir()
    (folder / "..data" / "node.toml").write_text(text)
    path.symlink_to(folder / "..data" / "node.toml")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/node.toml"))
    assert config.volumetry.normative_table == folder / "norms.csv"  # (read while validating: anchored first)
    assert config.node.data_dir == folder / "data"
    assert (config.tls.cert_file, config.tls.key_file) == (folder / "tls/node.pem", folder / "tls/node.key")
    assert config.destinations[0].token_file == folder / "vna.token"
    assert config.inference.models_dir == Path("/opt/models")  # absolute: as written
    assert config.audit_path() == folder / "data" / "audit.jsonl"
