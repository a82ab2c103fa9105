"""The config's checks beyond one key's type and range (`semid_dist.config`): of a config
file as YAML (`read_yaml`: UTF-8 text, one-line syntax errors, no duplicate keys or
self-referencing aliases), and across keys (`check_consistency`): values that each parse fine
but do not go together. Each raises `ConfigError` naming the problem and the fix."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from semid_dist.errors import ConfigError, one_line
from semid_dist.io.fs import FOLDER_NAME, redact_url, url_problem
from semid_dist.io.validate import check_distinct_columns

if TYPE_CHECKING:
    from semid_dist.config import BuildConfig, PruneConfig, QuantizerConfig

_MERGE_TAG = "tag:yaml.org,2002:merge"
_JVM_SIZE = re.compile(r"[0-9]+[kmgt]", re.IGNORECASE)  # as the JVM's -Xmx takes it
# Spark starts a driver whose JVM heap (Runtime.maxMemory) holds 1.5 x its 300 MiB reserve;
# under the serial or parallel collector that heap is below -Xmx, so 512m is the floor
_SPARK_DRIVER_MIN = 512 * 2**20
_LOCAL_THREADS_MAX = 1024  # local[100000]: ~100 s, then the JVM could not create a thread


def _jvm_bytes(size: str) -> int:
    """A JVM memory size (`_JVM_SIZE`: 512m, 2g) in bytes."""
    return int(size[:-1]) * 2 ** (10 * "kmgt".index(size[-1].lower()) + 10)


_SPARK_MASTER = re.compile(  # the master URLs Spark's SparkContext takes (a cluster manager
    # plugin takes its own scheme://...)
    r"yarn|local(\[([1-9][0-9]*|\*)(\s*,\s*[0-9]+)?\])?"
    r"|local-cluster\[\s*[0-9]+\s*,\s*[0-9]+\s*,\s*[0-9]+\s*\]|[A-Za-z][A-Za-z0-9+.-]*://\S+")


NAME_MAX = 255  # the longest file or directory name most file systems take (ext4, xfs)
_RAY_ADDRESS = re.compile(  # the forms ray.init takes: auto, local, a Ray Client URL, host:port
    r"auto|local|ray://\S+|[A-Za-z0-9_.-]+:[0-9]+|\[[0-9A-Fa-f:.]+\]:[0-9]+")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what it would take silently: a key given twice in one
    mapping (SafeLoader keeps the last), an alias inside the node it names (a
    self-referencing structure, which nothing downstream can walk) and a number YAML 1.1
    reads otherwise than it reads (`010`, octal: 8; `1:30`, base 60: 90)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self._open_anchors:
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} lies inside the node &{event.anchor} "
                "names (a self-referencing alias); write the values out instead",
                event.start_mark)
        if isinstance(event, yaml.AliasEvent) or event.anchor is None:
            return super().compose_node(parent, index)
        self._open_anchors.add(event.anchor)  # until its node is composed
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(event.anchor)

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicate_keys(node, "", set())
        return super().construct_document(node)

    def _check_duplicate_keys(self, node: yaml.Node, path: str, seen_nodes: set[int]) -> None:
        """Raise a marked YAML error at the second of two equal keys of a mapping (merge keys
        `<<` aside: overriding merged keys is what they are for), naming its dotted key. Keys
        are compared as the values they load as, so keys spelled differently that one dict
        would merge (`true` / `yes`, `1` / `0x1`) are duplicates too."""
        if id(node) in seen_nodes:  # an alias: checked where its anchor is
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, tuple[int, str]] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    self._check_duplicate_keys(value, path, seen_nodes)
                    continue
                dotted = f"{path}.{key.value}" if path else key.value
                loaded = self.construct_object(key)
                if loaded in first:
                    line, spelled = first[loaded]
                    spelling = "" if spelled == key.value else f" as {spelled!r}"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {dotted!r} (first given on line "
                        f"{line + 1}{spelling}); keep one of them", key.start_mark)
                first[loaded] = key.start_mark.line, key.value
                self._check_duplicate_keys(value, dotted, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicate_keys(item, f"{path}[{i}]", seen_nodes)


    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        digits = node.value.replace("_", "").lstrip("+-")
        if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXbB"):
            base = "base 60" if ":" in digits else "octal"
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as {value} in YAML 1.1 ({base}); write the "
                f"number without {'its :' if ':' in digits else 'the leading 0'}, or quote it "
                f"for text ('{node.value}' in a file, KEY=\"'{node.value}'\" in an override)",
                node.start_mark)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        if ":" in node.value:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as {super().construct_yaml_float(node)} in "
                f"YAML 1.1 (base 60); write the number without its :, or quote it for text "
                f"('{node.value}' in a file, KEY=\"'{node.value}'\" in an override)",
                node.start_mark)
        return super().construct_yaml_float(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)

# YAML 1.2's floats that PyYAML (YAML 1.1) reads as strings: an exponent without a dot or
# without a sign (`1e-3`, `1e3`, `1.0e3`); after PyYAML's own resolvers, so ints stay ints
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`text` parsed as YAML by a SafeLoader that refuses duplicate keys and
    self-referencing aliases (a `yaml.YAMLError` then)."""
    return yaml.load(text, Loader=_StrictLoader)


def override_value(key: str, raw: str) -> Any:
    """The value of override `key=raw` (YAML; "" for nothing), or the named ConfigError. A
    string keeps a ` #` YAML would read as a comment's start (`input.path=/data/cat #2`: a
    command line holds no comments; the path was cut at ` #`)."""
    try:
        value = load_yaml(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: "
                          f"{yaml_problem(exc)[1]}") from None
    if isinstance(value, str) and " #" in raw and raw.strip()[:1] not in ("'", '"'):
        return raw.strip()
    return value


def yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """(`line:column` of a YAML error, or "", and its problem in one line)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context_mark is not None:
            c = exc.context_mark
            problem += f" ({exc.context} at {c.line + 1}:{c.column + 1})"
        where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        return where, " ".join(problem.split())
    if isinstance(exc, yaml.reader.ReaderError):
        return "", f"{str(exc).splitlines()[0]} (character offset {exc.position})"
    return "", one_line(exc)


def read_yaml(path: Path) -> Any:
    """The YAML document of config file `path` (None when empty). A file that is missing, a
    directory, unreadable, not UTF-8 or not valid YAML raises ConfigError in one line: the
    file, the line:column and the problem."""
    if path.is_dir():
        inside = sorted(path.glob("*.y*ml"))
        example = f", e.g. {inside[0]}" if inside else ""
        raise ConfigError(f"config file {str(path)!r} is a directory, not a file; name a YAML "
                          f"config file{example}")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if not path.is_file():  # (read more than once: a pipe's second reading is empty)
        raise ConfigError(f"config file {str(path)!r} is not a regular file (a pipe, a "
                          "device or a socket); write the config to a file and name that")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}; "
                          "check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); a config is YAML, saved as UTF-8") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        raise ConfigError(f"{path}:{where + ': ' if where else ' '}not valid YAML: "
                          f"{problem}") from None


def _error_key(message: str) -> str:
    """The key a config error names: the message's first word (`key: ...`, `key=value ...`,
    `key[i]: ...`), the unknown key it names, or an override's that does not parse."""
    unknown = re.match(r"unknown config key '([^']+)'", message)
    malformed = re.match(r"override ([^:' ]+):", message)
    return (unknown.group(1) if unknown else malformed.group(1) if malformed
            else re.split(r"[:=\[ ]", message, maxsplit=1)[0])


def _own_override(message: str, overrides: list[str]) -> int | None:
    """The index of the override that set the key a config error `message` names (the last
    one that set it or a section above it; an override that is not key=value itself), or
    None where no override set it."""
    quoted = re.match(r"override '(.*)' is not key=value", message)
    if quoted:
        return next((i for i in reversed(range(len(overrides)))
                     if overrides[i] == quoted.group(1)), None)
    key = _error_key(message)
    names = [item.split("=", 1)[0].strip() for item in overrides]
    return next((i for i in reversed(range(len(overrides)))
                 if names[i] and (key == names[i] or key.startswith(names[i] + "."))), None)


# The start of the error of a dotted key inside a config's mappings (`fit.sample_size: 500`
# in a file; an override's own key is nested, its YAML value's keys are not).
DOTTED_KEY = "the key "


def _error_of(parse: Callable[[Any, list[str]], Any], data: Any,
              overrides: list[str]) -> str | None:
    """The config error `parse` gives for the file's data and these overrides (None: it
    parses)."""
    try:
        parse(data, overrides)
    except ConfigError as exc:
        return str(exc)
    return None


def overrides_at_fault(parse: Callable[[Any, list[str]], Any], data: Any, overrides: list[str],
                       message: str) -> list[str]:
    """The overrides that bring about a config error `message`; none where the file alone
    gives it. `parse`: `config.parse_config` (the file's data and overrides -> the config).

    Where an override set the key the error names (`_own_override`): it, and each other
    override without which the config parses or fails otherwise on that key (an error
    across keys: `quantizer.layers=[32,16]` beside `prune.layer=2`); not one that mends the
    file's value of a key checked first (without it, that key's error shows). Where the
    file set that key: each override without which the error is not the same (the file's
    `prune.layer: 2` against `quantizer.layers=[32,16]`). And any override of a dotted key
    the message names (`prune.tau=1.0` in "prune.strategy=sarq needs prune.tau in (0, 1)",
    whose default gives the same error). None for a dotted key the file alone gives
    (`fit.sample_size: 500` beside the override `fit.sample_size=600`)."""
    if message.startswith(DOTTED_KEY) and _error_of(parse, data, []) == message:
        return []
    own = _own_override(message, overrides)
    key = _error_key(message)

    def name(i: int) -> str:
        return overrides[i].split("=", 1)[0].strip()

    def named(i: int) -> bool:  # the value a dotted key the message names took (`prune.tau`
        later = {name(j) for j in range(i + 1, len(overrides))}  # in "sarq needs prune.tau")
        replaced = any(name(i) == n or name(i).startswith(n + ".") for n in later)
        return ("." in name(i) and not replaced and re.search(
            rf"(?<![\w.]){re.escape(name(i))}(?![\w.])", message) is not None)

    def needed(items: list[str]) -> bool:  # (the messages hold nothing that varies)
        got = _error_of(parse, data, items)
        return got is None or (got != message and (own is None or _error_key(got) == key))

    kept = list(range(len(overrides)))
    for i in range(len(overrides)):
        without = [j for j in kept if j != i]
        if i != own and not needed([overrides[j] for j in without]) and not named(i):
            kept = without
    return [overrides[j] for j in kept]


def check_table_name(table: str, key: str = "output.table") -> None:
    """output.table (or the commands' --table) is one directory under the root: nothing that
    climbs out of it or nests, nor a hidden or `_`-prefixed name."""
    if not FOLDER_NAME.fullmatch(table):
        raise ConfigError(f"{key}: {table!r} is not a table name: give one directory "
                          "name of letters, digits, '.', '_' and '-' that starts with a letter "
                          "or digit (the table lives at <output.root>/<output.table>/; put "
                          "parent directories in output.root), e.g. output.table=sids")
    if len(table) > NAME_MAX:  # (the build failed at its first write, blaming output.root)
        raise ConfigError(f"{key}: {table[:40]!r}... is {len(table)} characters long; a "
                          f"directory name holds at most {NAME_MAX} (the table lives at "
                          "<output.root>/<output.table>/): give a shorter one")


def check_consistency(cfg: BuildConfig) -> None:
    """Raise ConfigError naming the keys when values that each parsed fine do not go
    together (layer sizes and the 64-bit SID key, pruning, the learned quantizers and ACRQ,
    incremental encodes, the quality depth, two input keys naming one column), output.table
    is not one directory name, input.path or output.root a URL of no file system fsspec
    knows or with credentials in it, a Ray or Spark build's storage in this process's memory,
    ray.address an HTTP address, spark.master no master URL or spark.driver_memory no JVM
    memory size."""
    check_table_name(cfg.output.table)
    for key, url in (("input.path", cfg.input.path), ("output.root", cfg.output.root)):
        if (problem := url_problem(url)) is not None:
            raise ConfigError(f"{key}: {redact_url(url)}: {problem}")
    if cfg.engine != "local" and "memory://" in (cfg.input.path[:9], cfg.output.root[:9]):
        workers = "worker" if cfg.engine == "ray" else "executor"
        raise ConfigError(f"engine: {cfg.engine} needs input.path and output.root on storage "
                          f"every {workers} can reach (file://, s3://, gs://, hdfs://), not "
                          "memory:// (this process's memory); or engine: local")
    check_distinct_columns(cfg.input.id_column, cfg.input.embedding_column,
                           cfg.input.popularity_column)
    layers = cfg.quantizer.layers
    for i, size in enumerate(layers):
        if not 2 <= size <= 1 << 20:
            raise ConfigError(f"quantizer.layers[{i}]: {size} is out of range [2, 1048576]")
    if sum(math.log2(s + 1) for s in layers) > 62:
        raise ConfigError(
            f"quantizer.layers={list(layers)}: the product of (layer size + 1) exceeds 2^62, "
            "so a SID no longer fits one 64-bit key; use fewer or smaller layers")
    if cfg.encode.from_version is None and cfg.fit.sample_size < max(layers):
        raise ConfigError(f"fit.sample_size={cfg.fit.sample_size} is below the largest "
                          f"codebook's {max(layers)} codes (quantizer.layers={list(layers)}): "
                          f"a fit sample needs a row per code; raise fit.sample_size (to "
                          f"{max(layers)} or more) or use smaller layers")
    _check_prune(cfg.prune, layers)
    _check_learned(cfg)
    source = cfg.encode.from_version
    if source is not None and source != "latest" and not FOLDER_NAME.fullmatch(source):
        raise ConfigError(f"encode.from_version: {source!r} is not a version id: give one as "
                          "`semid versions list` prints it, or latest")
    if cfg.encode.incremental and not cfg.encode.from_version:
        raise ConfigError("encode.incremental=true extends the version named by "
                          "encode.from_version, which is unset; run `semid encode "
                          "--incremental` (from the latest version) or set "
                          "encode.from_version=<version id>")
    if re.match(r"https?://", cfg.ray.address or "", re.IGNORECASE):
        raise ConfigError(f"ray.address: {cfg.ray.address!r} is an HTTP address (the Ray "
                          "dashboard's, which `ray job submit --address` takes): give the "
                          "cluster's own address as `ray start --head` prints it "
                          "(HOST:6379), or auto inside a job submitted to it")
    if cfg.ray.address and not _RAY_ADDRESS.fullmatch(cfg.ray.address):
        raise ConfigError(f"ray.address: {cfg.ray.address!r} is no Ray address: give the "
                          "cluster's as `ray start --head` prints it (HOST:6379), "
                          "ray://HOST:10001 for Ray Client, or auto (RAY_ADDRESS, or the "
                          "cluster started on this machine); leave it unset for an embedded "
                          "local Ray")
    _check_spark(cfg)
    depth = cfg.quality_depth
    if depth > len(layers):
        raise ConfigError(
            f"metrics.quality_depth: {depth} > number of layers {len(layers)}; "
            f"set it to at most {len(layers)} or leave it unset")


def _check_spark(cfg: BuildConfig) -> None:
    master = cfg.spark.master
    if master is not None and (not _SPARK_MASTER.fullmatch(master)
                               or re.match(r"https?://", master, re.IGNORECASE)):  # its web UI
        raise ConfigError(f"spark.master: {master!r} is not a Spark master URL: give local[*], "
                          "local[N], spark://HOST:PORT, k8s://https://HOST:PORT or yarn, or "
                          "leave it unset (spark-submit's master, else local[*])")
    threads = re.match(r"local\[([0-9]+)", master or "")
    if threads and int(threads.group(1)) > _LOCAL_THREADS_MAX:
        raise ConfigError(f"spark.master: {master} runs {threads.group(1)} task threads in the "
                          f"driver's JVM, more than {_LOCAL_THREADS_MAX}; give local[N] with "
                          "N up to the machine's cores, or local[*] (as many as it has)")
    if re.search(r"(^|\s)-Xmx", cfg.spark.java_options or ""):
        raise ConfigError(f"spark.java_options: {cfg.spark.java_options!r} sets the JVM's heap "
                          "(-Xmx), which Spark refuses in Java options; give the driver's "
                          "through spark.driver_memory (an executor's: spark-submit's "
                          "--executor-memory) and remove -Xmx")
    if not _JVM_SIZE.fullmatch(cfg.spark.driver_memory):
        raise ConfigError(f"spark.driver_memory: {cfg.spark.driver_memory!r} is not a JVM "
                          "memory size: give a number and a unit, e.g. 2g or 512m")
    if _jvm_bytes(cfg.spark.driver_memory) < _SPARK_DRIVER_MIN:
        raise ConfigError(f"spark.driver_memory: {cfg.spark.driver_memory} is less than 512m: "
                          "Spark does not start a driver with less than 450 MiB of heap, and "
                          "the JVM gives it less than its -Xmx; give 512m or more (default 2g)")


def _check_acrq(cfg: BuildConfig) -> None:
    q = cfg.quantizer
    if q.method != "acrq":
        if q.anchor_layers or q.acrq_base != "rq_kmeans":
            raise ConfigError(f"quantizer.anchor_layers / acrq_base are for "
                              f"quantizer.method=acrq, not {q.method}; unset them")
        return
    anchors, layers = cfg.anchor_sizes, q.layers
    if len(anchors) != len(layers):
        raise ConfigError(f"quantizer.anchor_layers={list(anchors)} has {len(anchors)} sizes "
                          f"but quantizer.layers has {len(layers)}; give one per layer")
    for i, (a, k) in enumerate(zip(anchors, layers)):
        if not 1 <= a < k:
            raise ConfigError(f"quantizer.anchor_layers[{i}]: {a} must be in [1, {k - 1}] "
                              f"(below quantizer.layers[{i}]={k}, leaving room for the tail's "
                              "extension codewords)")
    if any(b < a for a, b in zip(anchors, anchors[1:])):
        raise ConfigError(f"quantizer.anchor_layers={list(anchors)} must not decrease over "
                          "the layers (ACRQ's curriculum: coarse early layers, finer later)")
    if not 0 < cfg.metrics.head_share < 1 and not cfg.encode.from_version:
        raise ConfigError(f"metrics.head_share: {cfg.metrics.head_share} leaves ACRQ's head or "
                          "tail empty (quantizer.method=acrq fits both); give a share strictly "
                          "between 0 and 1, e.g. 0.8")
    if not cfg.input.popularity_column and not cfg.encode.from_version:
        raise ConfigError("quantizer.method=acrq splits the fit sample into head and tail "
                          "items by popularity; set input.popularity_column")
    if cfg.fit.warm_start != "none":
        raise ConfigError("fit.warm_start=parent is not supported by quantizer.method=acrq; "
                          "set fit.warm_start=none")


def _check_learned(cfg: BuildConfig) -> None:
    q = cfg.quantizer
    for i, h in enumerate(q.hidden_dims):
        if not 1 <= h <= 65_536:
            raise ConfigError(f"quantizer.hidden_dims[{i}]: {h} is out of range [1, 65536]")
    _check_acrq(cfg)
    if not cfg.learned:
        if cfg.fit.precision != "fp32":
            raise ConfigError(f"fit.precision={cfg.fit.precision} is for the learned "
                              f"quantizers (rq_vae, r3vae, acrq with quantizer.acrq_base="
                              f"rq_vae), not {q.method}; set fit.precision=fp32")
        return
    if cfg.encode.precision != "fp32":
        raise ConfigError(f"encode.precision={cfg.encode.precision} is supported by "
                          f"residual k-means quantizers only (rq_kmeans, acrq with "
                          f"acrq_base=rq_kmeans), not {q.method}; set "
                          "encode.precision=fp32")
    if cfg.collisions.max_per_sid is not None:
        raise ConfigError(f"collisions.max_per_sid is supported by residual k-means "
                          f"quantizers only (rq_kmeans, acrq with acrq_base=rq_kmeans), not "
                          f"{q.method}; unset collisions.max_per_sid")
    if cfg.fit.warm_start != "none":
        raise ConfigError(f"fit.warm_start=parent is supported by quantizer.method=rq_kmeans "
                          f"only, not {q.method}; set fit.warm_start=none")
    if q.method == "r3vae" and not cfg.encode.from_version:  # (a re-encode fits nothing: a
        _check_r3vae(q)  # version trained before this check must match its own model)


def _check_r3vae(q: QuantizerConfig) -> None:
    """r3vae removes each latent's projection on its reference vector: a 1-dimensional
    latent keeps nothing (every item one SID); it mixes its `r3_topk` best codewords of each
    layer, of which the smallest holds min(layers)."""
    if q.latent_dim < 2:
        raise ConfigError(f"quantizer.latent_dim={q.latent_dim}: r3vae removes each latent's "
                          "projection on its reference vector, so a latent of 1 dimension "
                          "keeps nothing to code; set quantizer.latent_dim to 2 or more")
    if q.r3_topk > min(q.layers):
        raise ConfigError(f"quantizer.r3_topk={q.r3_topk} is more than the {min(q.layers)} "
                          "codewords of the smallest layer; set it to at most "
                          f"{min(q.layers)}")


def _check_prune(prune: PruneConfig, layers: tuple[int, ...] | list[int]) -> None:
    s, n_layers = prune.strategy, len(layers)
    if s != "none" and n_layers < 2:  # a pruned SID of one layer would be empty
        raise ConfigError(f"prune.strategy={s} needs at least 2 layers (one layer's pruned "
                          "SIDs would be empty); add a layer or set prune.strategy=none")
    if s in ("drop_layer", "top_k", "mass") and prune.layer >= n_layers:
        raise ConfigError(f"prune.layer: {prune.layer} but there are only {n_layers} layers "
                          f"(0..{n_layers - 1})")
    if s == "top_k" and prune.k > layers[prune.layer]:
        raise ConfigError(f"prune.k: {prune.k} is more than the {layers[prune.layer]} tokens "
                          f"of layer {prune.layer} (quantizer.layers[{prune.layer}]); give at "
                          f"most {layers[prune.layer]}")
    if s == "mass" and prune.p <= 0:
        raise ConfigError("prune.strategy=mass needs prune.p in (0, 1], e.g. prune.p=0.3")
    if s == "sarq" and not 0 < prune.tau < 1:
        raise ConfigError("prune.strategy=sarq needs prune.tau in (0, 1), e.g. prune.tau=0.001")
