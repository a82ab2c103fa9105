"""config.py: defaults, strict validation with dotted key names, overrides, shipped configs."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import yaml

from semid_dist.config import (
    _RANGES,
    BuildConfig,
    FitConfig,
    InputConfig,
    MetricsConfig,
    QuantizerConfig,
    _flat,
    apply_overrides,
    changed_settings,
    load_config,
    parse_config,
)
from semid_dist.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONF_FILES = sorted(CONF_DIR.glob("*.yaml"))
MINIMAL = {"input": {"path": "x"}, "output": {"root": "y"}}


def with_keys(**dotted):
    """MINIMAL plus `a__b=value` entries as nested dicts."""
    data = {"input": dict(MINIMAL["input"]), "output": dict(MINIMAL["output"])}
    for key, value in dotted.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def dataclass_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert isinstance(cfg, BuildConfig)
    assert cfg.input.path == "x" and cfg.output.root == "y"
    # every omitted field equals the dataclass default
    for section, cls in (("input", InputConfig), ("fit", FitConfig),
                         ("quantizer", QuantizerConfig), ("metrics", MetricsConfig)):
        for name, default in dataclass_defaults(cls).items():
            assert getattr(getattr(cfg, section), name) == default, f"{section}.{name}"
    assert cfg.output.table == "sids"
    assert cfg.engine == "ray" and cfg.seed == 0
    assert isinstance(cfg.quantizer.layers, tuple)
    assert cfg.quality_depth == min(2, len(cfg.quantizer.layers))
    round_trip = parse_config(cfg.to_dict())
    assert round_trip == cfg


@pytest.mark.parametrize("data, key", [
    ({**MINIMAL, "sed": 1}, "sed"),
    (with_keys(fit__sampel_size=10), "fit.sampel_size"),
    (with_keys(input__paths="z"), "input.paths"),
    (with_keys(quantizer__layer=[4, 4]), "quantizer.layer"),
])
def test_unknown_keys_raise_naming_the_dotted_key(data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert repr(key) in str(exc.value)


@pytest.mark.parametrize("key, value", [
    ("fit.num_workers", "2"),
    ("fit.num_workers", True),
    ("fit.num_workers", 2.5),
    ("seed", "0"),
    ("fit.use_gpu", "yes"),
    ("fit.use_gpu", 1),
    ("fit.cpus_per_worker", False),
    ("fit.cpus_per_worker", float("nan")),
    ("input.path", 3),
    ("input.path", ""),
    ("quantizer.layers", 64),
    ("quantizer.layers", []),
    ("fit", 5),
])
def test_wrong_types_raise_naming_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(**{key.replace(".", "__"): value}))
    assert key in str(exc.value)


def test_wrong_type_inside_list_names_the_element():
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(quantizer__layers=[64, True, 8]))
    assert "quantizer.layers[1]" in str(exc.value)


@pytest.mark.parametrize("key, value", [
    ("fit.num_workers", 0),
    ("fit.num_workers", -1),
    ("input.max_reject_fraction", 2),
    ("input.max_reject_fraction", -0.1),
    ("metrics.quality_depth", 0),
    ("seed", -1),
    ("encode.chunk_rows", 0),
    ("encode.rerank", 1),
])
def test_out_of_range_raises_naming_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(**{key.replace(".", "__"): value}))
    assert key in str(exc.value)
    assert "range" in str(exc.value)


def test_range_bounds_are_inclusive():
    cfg = parse_config(with_keys(fit__num_workers=1, input__max_reject_fraction=1))
    assert cfg.fit.num_workers == 1
    assert cfg.input.max_reject_fraction == 1.0
    assert isinstance(cfg.input.max_reject_fraction, float)


@pytest.mark.parametrize("key, value", [
    ("engine", "flink"),
    ("quantizer.method", "foo"),
    ("input.on_bad_rows", "skip"),
    ("prune.strategy", "sometimes"),
])
def test_bad_literal_raises_naming_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(**{key.replace(".", "__"): value}))
    msg = str(exc.value)
    assert key in msg and repr(value) in msg


@pytest.mark.parametrize("data, key", [
    ({"output": {"root": "y"}}, "input"),
    ({"input": {}, "output": {"root": "y"}}, "input.path"),
    ({"input": {"path": "x"}, "output": {}}, "output.root"),
])
def test_missing_required_keys(data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert repr(key) in str(exc.value)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="^config: expected a mapping, got list$"):
        parse_config(["input"])  # type: ignore[arg-type]


def test_apply_overrides_dotted_keys_and_yaml_values():
    original = with_keys(fit__num_workers=3)
    out = apply_overrides(original, ["quantizer.layers=[64,32]", "fit.use_gpu=true",
                                     "fit.sample_size=50000", "input.popularity_column=pop",
                                     "metrics.pd_t=0.5"])
    assert out["quantizer"]["layers"] == [64, 32]
    assert out["fit"] == {"num_workers": 3, "use_gpu": True, "sample_size": 50000}
    assert out["input"]["popularity_column"] == "pop"
    assert out["metrics"]["pd_t"] == 0.5
    assert "quantizer" not in original and "use_gpu" not in original["fit"]  # copy, not mutated
    cfg = parse_config(original, ["quantizer.layers=[64,32]", "fit.use_gpu=true"])
    assert cfg.quantizer.layers == (64, 32)
    assert cfg.fit.use_gpu is True
    assert cfg.fit.num_workers == 3


def test_override_values_are_validated_like_yaml():
    with pytest.raises(ConfigError) as exc:
        parse_config(MINIMAL, ["fit.num_workers=two"])
    assert "fit.num_workers" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config(MINIMAL, ["fit.sampel_size=3"])
    assert "fit.sampel_size" in str(exc.value)


def test_an_exponent_without_a_dot_is_a_number_in_files_and_overrides(tmp_path):
    """`quantizer.lr: 1e-3` (the README's own default) was the string '1e-3' to PyYAML
    (YAML 1.1 wants `1.0e-3`), and the config said "expected a number"; ints stay ints and
    what is no number stays a string."""
    cfg = parse_config(MINIMAL, ["quantizer.lr=1e-3", "quantizer.weight_decay=1E-5",
                                 "metrics.pd_t=5e-1", "fit.sample_size=20000"])
    assert (cfg.quantizer.lr, cfg.quantizer.weight_decay, cfg.metrics.pd_t) == (1e-3, 1e-5, 0.5)
    assert type(cfg.fit.sample_size) is int
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "\n")
    with open(path, "a") as f:
        f.write("metrics: {pd_t: 2e-1}\n")
    assert load_config(str(path)).metrics.pd_t == 0.2
    with pytest.raises(ConfigError, match=r"^output.table: expected a string, got the number "
                                          r"100000.0 \(YAML reads an unquoted number as one: "
                                          r"quote it as you wrote it, '1e5' or '100000.0', in"):
        parse_config(MINIMAL, ["output.table=1e5"])
    assert parse_config(MINIMAL, ["output.table='1e5'"]).output.table == "1e5"
    assert parse_config(MINIMAL, ["output.table=1e5x"]).output.table == "1e5x"


def test_a_string_override_keeps_a_hash_yaml_would_read_as_a_comment():
    """`input.path=/data/my cat #2` is the path as typed (YAML cut it at ` #` and the build
    said the cut path did not exist); quoted, it is the same; other values drop a comment."""
    out = apply_overrides(MINIMAL, ["input.path=/data/my cat #2", "output.root='/o #1'",
                                    "quantizer.layers=[8, 8] # two layers", "seed=3 #"])
    assert out["input"]["path"] == "/data/my cat #2" and out["output"]["root"] == "/o #1"
    assert out["quantizer"]["layers"] == [8, 8] and out["seed"] == 3


def test_a_url_protocol_is_known_when_fsspec_has_it_or_a_class_was_registered():
    """input.path / output.root of an unknown protocol is a config error naming the key; a
    file system registered in this process with a class (`fsspec.register_implementation`)
    is known, as fsspec would open it (only fsspec's list of known ones was asked)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    with pytest.raises(ConfigError, match=r"^output\.root: semidnofs://t: semidnofs:// is no "
                                          r"file system "):
        parse_config(with_keys(output__root="semidnofs://t"))
    with pytest.raises(ConfigError, match=r"^input\.path: simplecache::semidnofs://x: semidnofs:// "
                                          r"is no file system "):  # a chained URL's every link
        parse_config(with_keys(input__path="simplecache::semidnofs://x"))

    class ProbeFileSystem(MemoryFileSystem):
        protocol = "semidprobefs"

    fsspec.register_implementation("semidprobefs", ProbeFileSystem, clobber=True)
    cfg = parse_config(with_keys(input__path="semidprobefs://cat", output__root="s3://b/t"))
    assert cfg.input.path == "semidprobefs://cat"


def test_override_without_equals_raises():
    with pytest.raises(ConfigError) as exc:
        apply_overrides(MINIMAL, ["fit.use_gpu"])
    assert "fit.use_gpu" in str(exc.value)


def test_override_into_a_scalar_raises():
    with pytest.raises(ConfigError,
                       match="^override input.path.deeper: 'path' is not a section$"):
        apply_overrides(MINIMAL, ["input.path.deeper=1"])


def test_quality_depth_larger_than_layers_raises():
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(quantizer__layers=[8, 8], metrics__quality_depth=3))
    assert "metrics.quality_depth" in str(exc.value)
    ok = parse_config(with_keys(quantizer__layers=[8, 8], metrics__quality_depth=2))
    assert ok.quality_depth == 2
    assert parse_config(with_keys(quantizer__layers=[8])).quality_depth == 1


def test_layer_sizes_are_checked():
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(quantizer__layers=[8, 1]))
    assert "quantizer.layers[1]" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(quantizer__layers=[1 << 20] * 4))  # 2^80 > 2^62
    assert "quantizer.layers" in str(exc.value)


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fit.num_workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.input.path = "z"  # type: ignore[misc]


def test_shipped_configs_exist():
    assert CONF_FILES, f"no YAML configs under {CONF_DIR}"


@pytest.mark.parametrize("path", CONF_FILES, ids=[p.name for p in CONF_FILES])
def test_shipped_config_validates(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.input.path == raw["input"]["path"]
    assert cfg.output.root == raw["output"]["root"]
    assert list(cfg.quantizer.layers) == raw.get("quantizer", {}).get(
        "layers", list(QuantizerConfig().layers))


def test_numbers_yaml_1_1_reads_otherwise_are_refused_in_files_and_overrides(tmp_path):
    """`seed: 0123` was 83 and `fit.sample_size=010` 8 (octal), `quantizer.niter=1:30` 90
    (base 60), silently; quoted they are text, and 0, 0x10 and 1_000 still read as numbers."""
    for raw, read, base in (("010", 8, "octal"), ("1:30", 90, "base 60"),
                            ("1:30.5", 90.5, "base 60")):
        with pytest.raises(ConfigError, match=rf"^override seed: cannot parse value "
                                              rf"'{raw}': '{raw}' reads as {read} in YAML 1\.1 "
                                              rf"\({base}\); .*or quote it for text "
                                              rf"\('{raw}' in a file, KEY=\"'{raw}'\" in an "
                                              r"override\)$"):
            parse_config(MINIMAL, [f"seed={raw}"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "seed: 0123\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:7: not valid YAML: '0123' reads as "
                                          r"83 in YAML 1\.1 \(octal\); write the number "
                                          r"without the leading 0"):
        load_config(path)
    cfg = parse_config(MINIMAL, ["seed=0", "fit.sample_size=0x1000", "encode.shard_rows=1_000",
                                 "output.table='010'"])
    assert (cfg.seed, cfg.fit.sample_size, cfg.encode.shard_rows, cfg.output.table) == (
        0, 4096, 1000, "010")


def test_yaml_that_is_no_mapping_or_no_text_says_what_it_read(tmp_path):
    """A file of `false` or `[]` was an empty config (a build ran from it on overrides);
    an empty section said `got NoneType`; an unquoted on / off / date where text goes says
    that YAML read it otherwise and to quote it."""
    for text, got in (("false", "False"), ("[]", "list"), ("0", "0")):
        path = tmp_path / "c.yaml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"c\.yaml: config: expected a mapping, got "
                                              rf"{got}$"):
            load_config(path, ["input.path=/cat", "output.root=/out"])
    with pytest.raises(ConfigError, match=r"^fit: expected a mapping, got nothing \(a section "
                                          r"without keys: give it some, or remove it\)$"):
        parse_config({**MINIMAL, "fit": None})
    with pytest.raises(ConfigError, match=r"^output\.table: expected a non-empty string, got "
                                          r"True \(YAML reads an unquoted yes / no / on / off "
                                          r"/ true / false as a boolean: quote it, as 'on' in a "
                                          r"file or output\.table=\"'on'\" in an override\)$"):
        parse_config(MINIMAL, ["output.table=on"])
    assert parse_config(MINIMAL, ["output.table='on'"]).output.table == "on"  # (as it says)
    with pytest.raises(ConfigError, match=r"^prune\.strategy: False \(YAML reads an unquoted "
                                          r"yes / no / on / off / true / false as a boolean\) is "
                                          r"not one of none \| "):  # (no quoting: no choice)
        parse_config(MINIMAL, ["prune.strategy=off"])
    with pytest.raises(ConfigError, match=r"got datetime\.date\(2026, 1, 1\) \(YAML reads an "
                                          r"unquoted date as one: quote it, as '2026-01-01' in "
                                          r"a file or output\.table=\"'2026-01-01'\" in an "
                                          r"override\)$"):
        parse_config(MINIMAL, ["output.table=2026-01-01"])


def test_a_config_that_is_no_regular_file_is_named_so(tmp_path):
    """A pipe (`semid validate <(cat c.yaml)`) was said not to exist; it is read more than
    once, so it is refused as what it is."""
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo\.yaml' is not a regular file \(a pipe, a "
                                          r"device or a socket\); write the config to a file"):
        load_config(fifo)


def test_load_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_keys(fit__sampel_size=3)))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert str(bad) in str(exc.value) and "fit.sampel_size" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(exc.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:2:1: not valid YAML: "):
        load_config(broken)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(good, ["engine=local"]).engine == "local"


def test_encode_precision_is_checked():
    assert parse_config(with_keys(encode__precision="bf16")).encode.precision == "bf16"
    assert parse_config(with_keys(encode__precision="tf32")).encode.precision == "tf32"
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(encode__precision="fp8"))
    assert "encode.precision" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(encode__precision="bf16", quantizer__method="rq_vae"))
    assert "encode.precision=fp32" in str(exc.value)


@pytest.mark.parametrize("table", ["../esc", "a/b", "a\\b", ".", "..", ".hidden", "_latest",
                                   "/abs", " sids"])
def test_output_table_must_be_one_directory_name(table):
    with pytest.raises(ConfigError) as exc:
        parse_config(with_keys(output__table=table))
    assert "output.table" in str(exc.value) and "output.table=sids" in str(exc.value)
    with pytest.raises(ConfigError, match="output.table"):
        parse_config(with_keys(output__table=""))


@pytest.mark.parametrize("table", ["sids", "catalog_sids", "sids-2026.1", "V2"])
def test_output_table_names_that_stay_under_the_root(table):
    assert parse_config(with_keys(output__table=table)).output.table == table


def test_load_config_refuses_duplicate_keys_naming_the_dotted_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("input: {path: x}\noutput: {root: y}\nquantizer:\n  layers: [8, 8]\n"
                    "  niter: 3\n  layers: [4, 4]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (f"{path}:6:3: not valid YAML: duplicate key 'quantizer.layers' "
                              "(first given on line 4); keep one of them")


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("input: {path: x}\noutput: {root: y}\nseed: &s 2\n"
                    "metrics: {quality_depth: *s}\nencode: &e {num_actors: 3}\n")
    assert load_config(path).metrics.quality_depth == 2
    out = apply_overrides(MINIMAL, ["fit={<<: {num_workers: 1}, num_workers: 2}"])
    assert out["fit"] == {"num_workers": 2}  # overriding a merged key is not a duplicate
    with pytest.raises(ConfigError) as exc:
        apply_overrides(MINIMAL, ["fit={<<: {num_workers: 1}, seed: 1, seed: 2}"])
    assert "duplicate key 'seed'" in str(exc.value)


def test_self_referencing_alias_and_bad_encoding_are_config_errors(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("input: &i {path: x, more: *i}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{path}:1:" in str(exc.value) and "self-referencing alias" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        apply_overrides(MINIMAL, ["fit=&f [*f]"])
    assert "override fit" in str(exc.value) and "self-referencing" in str(exc.value)
    path.write_bytes("seed: 1\nengine: r\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset 17)")
    path.write_bytes("\ufeffinput: {path: x}\noutput: {root: y}\n".encode())  # BOM: fine
    assert load_config(path).input.path == "x"


def test_non_string_keys_are_unknown_keys():
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, 1: "a", "zz": 2})
    assert "unknown config key 1" in str(exc.value)


def test_keys_spelled_differently_that_load_as_one_key_are_duplicates(tmp_path):
    path = tmp_path / "spelled.yaml"
    path.write_text("input: {path: x}\noutput: {root: y}\nfit:\n  steps:\n    1: a\n"
                    "    0x1: b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (f"{path}:6:5: not valid YAML: duplicate key 'fit.steps.0x1' "
                              "(first given on line 5 as '1'); keep one of them")
    with pytest.raises(ConfigError, match=r"duplicate key 'yes' \(first given on line 1 "
                                          r"as 'true'\)"):
        apply_overrides(MINIMAL, ["metrics={true: 1, yes: 2}"])
    assert apply_overrides(MINIMAL, ["metrics={'1': 1, 1: 2}"])["metrics"] == {"1": 1, 1: 2}


def test_a_dotted_key_in_a_file_says_to_nest_it_and_blames_no_override(tmp_path):
    """`fit.sample_size: 500` in a file was an unknown key, and beside the override
    `fit.sample_size=600` the error named that override, which is right."""
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\noutput: {root: y}\nfit.sample_size: 500\n")
    want = (f"{path}: the key 'fit.sample_size' is dotted: a config nests its keys "
            "(fit: {sample_size: ...}); dotted keys are for key=value overrides on the command "
            "line")
    for overrides in ([], ["fit.sample_size=600"], ["seed=3", "fit.sample_size=600"]):
        with pytest.raises(ConfigError) as exc:
            load_config(path, overrides)
        assert str(exc.value) == want
    path.write_text("input: {path: x}\noutput: {root: y}\n")
    with pytest.raises(ConfigError) as exc:  # a key no section holds: unknown, the override's
        load_config(path, ["seed=3", "fit={sample_size.x: 1}"])
    assert str(exc.value).startswith(f"{path} with override fit={{sample_size.x: 1}}: unknown "
                                     "config key 'fit.sample_size.x'"), exc.value
    path.write_text("input: {path: x}\noutput: {root: y}\nseed.x: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'seed\.x' \(known keys"):
        load_config(path, [])  # (seed holds no keys)
    path.write_text("input: {path: x}\noutput: {root: y}\nfit: {warm.start: none}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'fit.warm.start' \(known keys "):
        load_config(path, [])  # (no key `warm` in fit)
    path.write_text("input: {path: x}\noutput: {root: y}\nprune: {strategy: sarq}\n")
    with pytest.raises(ConfigError) as exc:  # the file's error, but the override's value
        load_config(path, ["seed=3", "prune.tau=1.0"])
    assert str(exc.value).startswith(f"{path} with override prune.tau=1.0: prune.strategy=sarq "
                                     "needs prune.tau"), exc.value


def test_an_error_in_an_overridden_key_names_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\noutput: {root: y, table: ../z}\n")
    good = tmp_path / "good.yaml"
    good.write_text("input: {path: x}\noutput: {root: y}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(good, ["quantizer.layers=[1]", "seed=3"])
    assert str(exc.value) == (f"{good} with override quantizer.layers=[1]: quantizer.layers[0]: "
                              "1 is out of range [2, 1048576]")
    with pytest.raises(ConfigError) as exc:  # the file's bad table name, mended: not named
        load_config(path, ["quantizer.layers=[1]", "output.table=sids"])
    assert str(exc.value) == (f"{path} with override quantizer.layers=[1]: quantizer.layers[0]: "
                              "1 is out of range [2, 1048576]")
    for malformed in ("fit.sample_size", "quantizer.layers=[32,16", "seed.x=1"):
        with pytest.raises(ConfigError) as exc:  # an override that does not parse
            load_config(path, ["seed=3", malformed])
        assert str(exc.value).startswith(f"{path} with override {malformed}: override ")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["seed=3"])  # the bad value is the file's
    assert str(exc.value).startswith(f"{path}: output.table: '../z' is not a table name")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["output={root: y, table: a/b}"])  # a section above the key
    assert str(exc.value).startswith(f"{path} with override output={{root: y, table: a/b}}: "
                                     "output.table: 'a/b'")
    ok = ["output.table=sids"]
    with pytest.raises(ConfigError) as exc:  # an unknown key
        load_config(path, [*ok, "fit.smaple_size=5"])
    assert str(exc.value).startswith(f"{path} with override fit.smaple_size=5: unknown config "
                                     "key 'fit.smaple_size'")
    with pytest.raises(ConfigError) as exc:  # a key=value message
        load_config(path, [*ok, "encode.incremental=true"])
    assert str(exc.value).startswith(f"{path} with override encode.incremental=true: "
                                     "encode.incremental=true extends")
    learned = tmp_path / "learned.yaml"
    learned.write_text("input: {path: x}\noutput: {root: y}\nquantizer: {method: rq_vae}\n"
                       "fit: {precision: bf16}\nencode: {precision: tf32}\n")
    with pytest.raises(ConfigError) as exc:  # it mends the file's encode.precision, and
        load_config(learned, ["quantizer.method=rq_kmeans"])  # makes its fit.precision wrong
    assert str(exc.value).startswith(f"{learned} with override quantizer.method=rq_kmeans: "
                                     "fit.precision")


def test_a_cross_key_error_an_override_brings_about_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {path: x}\noutput: {root: y}\nprune: {strategy: top_k, layer: 2}\n")
    with pytest.raises(ConfigError) as exc:  # the file's prune.layer against the override
        load_config(path, ["seed=3", "quantizer.layers=[32,16]"])
    assert str(exc.value) == (f"{path} with override quantizer.layers=[32,16]: prune.layer: 2 "
                              "but there are only 2 layers (0..1)")
    path.write_text("input: {path: x}\noutput: {root: y}\nprune: {layer: 2}\n")
    with pytest.raises(ConfigError) as exc:  # neither override alone is at fault
        load_config(path, ["prune.strategy=top_k", "seed=3", "quantizer.layers=[32,16]"])
    assert str(exc.value).startswith(f"{path} with overrides prune.strategy=top_k, "
                                     "quantizer.layers=[32,16]: prune.layer: 2 but")
    path.write_text("input: {path: x}\noutput: {root: y}\nquantizer: {layers: [8]}\n"
                    "prune: {strategy: drop_layer}\n")
    with pytest.raises(ConfigError) as exc:  # the file alone gives it
        load_config(path, ["seed=3"])
    assert str(exc.value) == (f"{path}: prune.strategy=drop_layer needs at least 2 layers "
                              "(one layer's pruned SIDs would be empty); add a layer or set "
                              "prune.strategy=none")
    path.write_text("input: {path: x}\noutput: {root: y}\nquantizer: {layers: [8, 16]}\n"
                    "prune: {strategy: top_k}\n")
    assert load_config(path, ["prune.k=16"]).prune.k == 16  # every token of layer 1
    with pytest.raises(ConfigError) as exc:  # (the same as 16 before, silently)
        load_config(path, ["prune.k=17"])
    assert str(exc.value) == (f"{path} with override prune.k=17: prune.k: 17 is more than the "
                              "16 tokens of layer 1 (quantizer.layers[1]); give at most 16")
    for strategy in ("top_k", "mass", "sarq"):  # each left a pruned item an empty SID
        path.write_text("input: {path: x}\noutput: {root: y}\nquantizer: {layers: [8]}\n"
                        f"prune: {{strategy: {strategy}, layer: 0, k: 2, p: 0.5, tau: 0.1}}\n")
        with pytest.raises(ConfigError) as exc:
            load_config(path, [])
        assert str(exc.value).startswith(
            f"{path}: prune.strategy={strategy} needs at least 2 layers (one layer's")
    path.write_text("input: {path: x, popularity_column: pop}\noutput: {root: y}\n")
    for overrides, named in (  # the key's own override, and those the error needs beside it
            (["quantizer.layers=[32,16]", "seed=3", "prune.layer=2", "prune.strategy=top_k"],
             "quantizer.layers=[32,16], prune.layer=2, prune.strategy=top_k: prune.layer: 2"),
            (["quantizer.method=rq_vae", "collisions.max_per_sid=3"],
             "quantizer.method=rq_vae, collisions.max_per_sid=3: collisions.max_per_sid is"),
            (["input.popularity_column=null", "quantizer.method=acrq"],
             "input.popularity_column=null, quantizer.method=acrq: quantizer.method=acrq "
             "splits"),
            (["prune.strategy=sarq", "seed=3", "prune.tau=1.0"],  # (the default tau=0 gives
             "prune.strategy=sarq, prune.tau=1.0: prune.strategy=sarq needs prune.tau")):  # it)
        with pytest.raises(ConfigError) as exc:
            load_config(path, overrides)
        assert str(exc.value).startswith(f"{path} with overrides {named}"), str(exc.value)
    path.write_text("input: {path: x}\noutput: {root: y}\nprune: {strategy: top_k, layer: 5}\n")
    with pytest.raises(ConfigError) as exc:  # one key set twice: the value it took
        load_config(path, ["prune.layer=1", "prune.layer=3"])
    assert str(exc.value).startswith(f"{path} with override prune.layer=3: prune.layer: 3 but")


def test_encode_from_version_is_a_version_id():
    for good in ("latest", "20261122T020000123456Z-ab12cd"):
        assert parse_config({**MINIMAL, "encode": {"from_version": good}})
    for bad in ("../versions/x", "./x", "x/"):  # (semid validate said ok)
        with pytest.raises(ConfigError, match=r"encode.from_version: .* is not a version id"):
            parse_config({**MINIMAL, "encode": {"from_version": bad}})


def test_a_table_name_longer_than_a_directory_name_can_be_is_a_config_error():
    """A 300-character output.table passed the checks and the dry run; the build failed at
    its first write with ENAMETOOLONG and advice about output.root."""
    assert parse_config(MINIMAL, [f"output.table={'t' * 255}"]).output.table == "t" * 255
    with pytest.raises(ConfigError, match=r"^output\.table: 'tttt.*'\.\.\. is 300 characters "
                                          r"long; a directory name holds at most 255 "):
        parse_config(MINIMAL, [f"output.table={'t' * 300}"])


def test_ray_address_is_no_http_address():
    for good in ("auto", "10.0.0.1:6379", "ray://head:10001", "head-node.local:6379",
                 "[::1]:6379", "local"):
        assert parse_config({**MINIMAL, "ray": {"address": good}}).ray.address == good
    for bad in ("none", "head", "head:", "10.0.0.1:port"):  # (Ray: Invalid address format)
        with pytest.raises(ConfigError, match=rf"^ray\.address: '{bad}' is no Ray address: "
                                              r"give the cluster's as `ray start --head` "
                                              r"prints it \(HOST:6379\)"):
            parse_config({**MINIMAL, "ray": {"address": bad}})
    for bad in ("http://head:8265", "https://head:8265", "HTTP://head:8265"):
        with pytest.raises(ConfigError, match=r"ray.address: .* is an HTTP address \(the Ray "
                                              r"dashboard's"):
            parse_config({**MINIMAL, "ray": {"address": bad}})


def test_spark_master_is_a_master_url():
    for good in ("local", "local[*]", "local[2]", "local[4, 2]", "local-cluster[2,1,1024]",
                 "spark://a:7077", "spark://a:7077,b:7077", "k8s://https://k:443", "yarn",
                 "nomad://n:4646"):  # (a cluster manager plugin's scheme)
        assert parse_config({**MINIMAL, "spark": {"master": good}}).spark.master == good
    for bad in ("bogus", "local[x]", "localhost", "spark://", "local[2", "http://m:8080",
                "local[0]"):
        with pytest.raises(ConfigError, match=r"spark.master: .* is not a Spark master URL: "
                                              r"give local\[\*\]"):
            parse_config({**MINIMAL, "spark": {"master": bad}})
    assert parse_config({**MINIMAL, "spark": {"master": "local[1024, 3]"}})
    for many in ("local[1025]", "local[100000, 2]"):  # (a JVM of that many threads: ~100 s,
        # then its OutOfMemoryError: unable to create native thread)
        with pytest.raises(ConfigError, match=r"spark.master: local\[.* task threads in the "
                                              r"driver's JVM, more than 1024; give local\[N\]"):
            parse_config({**MINIMAL, "spark": {"master": many}})


def test_spark_java_options_leave_the_heap_to_driver_memory():
    """-Xmx in spark.java_options: Spark refuses it (its usage text, ~96 lines, at the
    session's start); said at once, naming spark.driver_memory. -Xms and -Xss pass."""
    assert parse_config({**MINIMAL, "spark": {"java_options": "-Xms1g -Xss4m"}})
    for bad in ("-Xmx100m", "-XX:TieredStopAtLevel=1 -Xmx2g"):
        with pytest.raises(ConfigError, match=r"spark.java_options: .* sets the JVM's heap "
                                              r"\(-Xmx\), .*spark.driver_memory"):
            parse_config({**MINIMAL, "spark": {"java_options": bad}})


def test_spark_driver_memory_is_a_jvm_memory_size():
    for good in ("2g", "512m", "1G", "1t"):
        assert parse_config({**MINIMAL, "spark": {"driver_memory": good}})
    for bad in ("lots", "2 gigs", "1.5g", "-2g", "g", "1GB", "2gb", "4096"):  # -Xmx refuses
        with pytest.raises(ConfigError, match=r"spark.driver_memory: .* is not a JVM memory "
                                              r"size: give a number and a unit, e.g. 2g"):
            parse_config({**MINIMAL, "spark": {"driver_memory": bad}})
    for small in ("8m", "300m", "450m", "511m", "524287k"):  # a driver Spark does not start
        with pytest.raises(ConfigError, match=rf"spark.driver_memory: {small} is less than "
                                              r"512m: Spark does not start a driver with less "
                                              r"than 450 MiB of heap.*; give 512m or more"):
            parse_config({**MINIMAL, "spark": {"driver_memory": small}})
    for enough in ("512m", "524288k"):
        assert parse_config({**MINIMAL, "spark": {"driver_memory": enough}})


def test_a_number_where_a_string_goes_says_to_quote_it():
    """YAML's (or an override's) unquoted `table: 2026` or `driver_memory: 2` is a number: the
    error says so and how to give the text (it said "expected a non-empty string, got 2",
    as if the text were missing; a number is not taken as its text, since YAML reads
    `010` as 8)."""
    for key, value in (("output.table", 2026), ("spark.driver_memory", 2),
                       ("input.id_column", 1.5)):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"^{key}: expected a string, got the number "
                                              rf"{value} \(YAML reads an unquoted number as "
                                              rf"one: quote it, as '{value}' in a file or "
                                              rf"{key}=\"'{value}'\" in an override, or check"):
            parse_config({**MINIMAL, section: {**MINIMAL.get(section, {}), name: value}})
    with pytest.raises(ConfigError, match="input.id_column: expected a non-empty string, got "
                                          "True"):
        parse_config({**MINIMAL, "input": {**MINIMAL["input"], "id_column": True}})


def test_a_relative_output_root_in_a_ray_jobs_working_dir_copy_is_an_error(
        small_catalog, tmp_path, monkeypatch, capsys):
    """`ray job submit --working-dir .` runs the job in a copy Ray removes with its session:
    a relative output.root (conf/demo.yaml's `out/demo`) committed the table into it."""
    from semid_dist.cli import main

    catalog, _ = small_catalog
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    cfg = copy / "c.yaml"
    cfg.write_text(yaml.safe_dump({"engine": "local", "input": {"path": catalog},
                                   "output": {"root": "out/demo"},
                                   "quantizer": {"layers": [8, 4], "niter": 2}}))
    assert main(["build", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "semid build: error: output.root=out/demo is relative, and this job runs in the copy "
        f"of its working directory Ray made ({copy}), which Ray removes: the table would go "
        "with it; give output.root as an absolute path or a URL the cluster keeps (s3://...)")
    assert not (copy / "out").exists()
    assert main(["build", "--config", str(cfg), f"output.root={tmp_path / 'kept'}"]) == 0
    assert (tmp_path / "kept" / "sids" / "_latest").exists()


@pytest.mark.parametrize("engine, workers", [("ray", "worker"), ("spark", "executor")])
@pytest.mark.parametrize("key", ["input__path", "output__root"])
def test_ray_and_spark_refuse_storage_in_this_process_memory(engine, workers, key):
    """Their workers are other processes: an in-memory filesystem is a config error (so
    `semid validate` says it too), before an engine starts; the local engine takes it."""
    data = with_keys(engine=engine, **{key: "memory://cat"})
    with pytest.raises(ConfigError, match=f"^engine: {engine} needs input.path and output.root "
                                          f"on storage every {workers} can reach .* not "
                                          r"memory:// \(this process's memory\); or engine: "
                                          "local$"):
        parse_config(data)
    assert parse_config(with_keys(engine="local", **{key: "memory://cat"})).engine == "local"


def test_changed_settings_name_what_differs_from_the_defaults():
    """A build's first log line: input.path and output.root, then every setting other than
    its default, in the config's order (a default given explicitly is left out)."""
    cfg = parse_config({**MINIMAL, "engine": "local", "quantizer": {"layers": [64, 64]},
                        "fit": {"sample_size": 100000, "cpus_per_worker": 1},
                        "output": {"root": "y", "table": "010"},
                        "spark": {"app_name": "my app", "java_options": None,
                                  "master": "local[*]"}})
    line = changed_settings(cfg)
    assert line == (
        "input.path=x output.root=y output.table='\"010\"' engine=local "
        "quantizer.layers='[64,64]' fit.cpus_per_worker=1.0 spark.master='local[*]' "
        "spark.app_name='my app' spark.java_options=null")
    # as a shell gives them back, the overrides make the same config
    assert parse_config({}, shlex.split(line)) == cfg
    assert changed_settings(parse_config(MINIMAL)) == "input.path=x output.root=y"


def test_every_config_key_is_in_the_readme():
    """Each key a config takes is named whole in README (`fit.use_gpu`), and the documented
    range of collisions.candidates is the one the config enforces."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    keys = list(_flat(parse_config(MINIMAL).to_dict()))
    assert "collisions.candidates" in keys and "quantizer.r3_lambda" in keys
    assert [k for k in keys if f"`{k}`" not in readme] == []
    low, high = _RANGES["collisions.candidates"]
    assert f"last-layer candidates kept per item for the moves, {low} to {high}" in readme


def test_an_experiment_jobs_root_and_the_keys_it_sets():
    """jobs/prune_sweep.py and jobs/compare_quantizers.py write under --root (default a
    temporary directory here): a cluster's workers need one they reach, and an override of
    a key the job sets, whole or inside its section, would be lost."""
    from semid_dist.runtime import check_experiment_root, refuse_overrides

    check_experiment_root(parse_config(MINIMAL, ["engine=local"]), None)
    for over in (["engine=ray", "ray.address=auto"], ["engine=spark", "spark.master=yarn"]):
        cluster = parse_config(MINIMAL, over)
        with pytest.raises(ConfigError, match="runs on a cluster here: give --root on stora"):
            check_experiment_root(cluster, None)
        check_experiment_root(cluster, "s3://bucket/sweep")
    both = ("output.root", "output.table")
    for given, key in (("output.root=/x", "output.root"), ("output={table: t}", "output.table"),
                       (" output.table = t", "output.table")):
        with pytest.raises(ConfigError) as exc:
            refuse_overrides([given], "comparison", both)
        assert str(exc.value).startswith(
            f"{given.split('=')[0]}: {key} is set by the comparison itself: ")
    refuse_overrides(["output.table=t", "seed=3", "output={table: t}"], "sweep",
                     ("output.root",))  # the sweep keeps the table's name
