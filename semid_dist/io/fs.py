"""fsspec helpers: resolve URLs, write files so readers never see a half-written one, and
keep credentials out of everything written or logged (`redact_url`)."""

from __future__ import annotations

import errno
import os
import posixpath
import re
import socket
import ssl
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from semid_dist.errors import ConfigError, SemidError, StoreError, one_line, wrapped_errors

# `scheme://user:secret@host...` anywhere in a string (a user without ':' is no secret, and
# `abfs://container@account` names a container); AWS secret keys may hold '/'
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s:]*:[^@\s]*@")
# query parameters that carry secrets: X-Amz-Signature / -Credential / -Security-Token,
# Azure SAS `sig`, `token`, `password`, `AWSAccessKeyId` ...
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&][^=&#\s]*(?:sig|token|secret|passw|credential|key)[^=&#\s]*=)[^&#\s'\"]*",
    re.IGNORECASE)
# one folder name that climbs out of nothing and hides nothing: a table under output.root,
# a version under its table's versions/
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# fsspec filesystems that do not read credentials from the URL (a `KEY:SECRET@` there
# becomes part of the bucket name and ends up in error messages)
_NO_URL_CREDENTIALS = ("s3", "s3a", "gs", "gcs", "file", "local", "memory")
# a bucket's URL with user info (a bucket's name holds no '@'): `s3://KEY@bucket/x`
_BUCKET_USER = re.compile(r"(?P<scheme>\b(?:s3a?|gs|gcs)://)(?!\*\*\*@)[^/@\s'\"?#()<>]+@",
                          re.IGNORECASE)
_AWS = ("give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE) or "
        "the machine's role")
_GCP = ("give them as GOOGLE_APPLICATION_CREDENTIALS (a service account's key file) or the "
        "machine's service account")
_CREDENTIALS_ADVICE = {"s3": _AWS, "s3a": _AWS, "gs": _GCP, "gcs": _GCP}
_FREE_SPACE = "free space on that file system"
_STORAGE_ADVICE = {errno.ENOSPC: _FREE_SPACE, errno.EDQUOT: _FREE_SPACE,
                   errno.EROFS: "that file system is mounted read-only: make it writable"}


def redact_url(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with credentials replaced by `***`: the
    user info of `s3://KEY:SECRET@bucket/x` or `ftp://user:pw@host/x` (-> `s3://***@bucket/x`),
    any user info of a bucket's URL (`s3://KEY@bucket/x`: a bucket's name holds no `@`)
    and the values of secret-bearing query parameters (`?X-Amz-Signature=***`)."""
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    text = _BUCKET_USER.sub(r"\g<scheme>***@", text)
    return _SECRET_PARAM.sub(r"\g<name>***", text)


def redact(value: Any) -> Any:
    """`redact_url` on every string inside plain data (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def url_problem(url: str) -> str | None:
    """What is wrong with a URL before any file system is asked: credentials in it where
    the file system takes none from URLs, or a protocol fsspec knows no file system of
    (neither a known implementation nor one registered in this process); None when nothing
    is. No file system's package is imported."""
    for link in url.split("::"):  # (a chained URL's every link: `simplecache::s3://...`)
        own = fsspec.utils.get_protocol(link)
        if own not in fsspec.available_protocols() and own not in fsspec.registry:
            return (f"{own}:// is no file system fsspec knows; give a local path or a URL "
                    "such as file://, s3://, gs://, hdfs:// or memory://")
        if own in _NO_URL_CREDENTIALS and (_URL_CREDENTIALS.match(link)
                                           or _BUCKET_USER.match(link)):
            return (f"{own}:// URLs take no credentials (they would end up in logs and "
                    "manifests); remove the user info ('KEY:SECRET@' or 'KEY@') and "
                    f"{_CREDENTIALS_ADVICE.get(own, 'give none: none are needed')}")
    return None


def resolve(url: str) -> tuple[AbstractFileSystem, str]:
    """URL (file://, s3://, memory://, plain path ...) -> (filesystem, path inside it)."""
    protocol = fsspec.utils.get_protocol(url)
    if (problem := url_problem(url)) is not None:
        raise ConfigError(f"{redact_url(url)}: {problem}")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # the file system's package (fsspec names it)
        raise ConfigError(f"{redact_url(url)}: the {protocol}:// file system is not installed "
                          f"({one_line(exc)})") from None
    except OSError as exc:
        if protocol not in ("hdfs", "viewfs") or exc.errno is not None:
            raise  # (a server that does not answer: the caller names the key)
        reason = one_line(exc)  # (libjvm: every folder it looked in, ~100 of them)
        raise ConfigError(f"{redact_url(url)}: the {protocol}:// file system cannot be opened "
                          f"here ({type(exc).__name__}: "
                          f"{reason if len(reason) <= 300 else reason[:300] + ' ...'}); it "
                          "needs Java and Hadoop's libhdfs on this machine, with JAVA_HOME, "
                          "HADOOP_HOME and CLASSPATH set") from None
    return fs, path.rstrip("/") or path


def tcp_refusal(address: str) -> OSError | None:
    """Why a server's `host:port` (a Ray or Spark cluster's, an HTTP catalog's) accepts no
    TCP connection within 10 s, or None when it does or `address` is no `host:port` (a
    form left to the client: its own clients retry such an address for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        return exc
    return None


def storage_advice(exc: BaseException, *, table: bool = False) -> str | None:
    """What to do about a storage failure a user can mend (a full disk or quota, a read-only
    mount, a permission denied: a local file's, or an object store's `Access Denied`, which
    has no errno), or None for any other error (an SSL or connection error is an OSError
    whose errno may read as EPERM). `table`: the failure may be the table's file system's
    (a full one: `semid versions gc` frees it)."""
    if isinstance(exc, ssl.SSLError | ConnectionError) or not isinstance(exc, OSError):
        return None
    if isinstance(exc, PermissionError):
        return "give this user (or these credentials) access to it"
    advice = _STORAGE_ADVICE.get(exc.errno)
    if advice == _FREE_SPACE and table:
        advice += (" (the table's: `semid versions gc` removes old versions and the work "
                   "files of builds that are gone)")
    return advice


# the object stores' clients' errors for a server that does not answer or went away in the
# middle of a request (botocore's, aiohttp's), by name; builtin ConnectionErrors and
# TimeoutErrors are not taken for them (a Ray or Spark connection's, a closed stderr's)
NO_ANSWER = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
              "ConnectionClosedError", "ProxyConnectionError", "ResponseStreamingError",
              "IncompleteReadError", "ClientConnectorError", "ClientOSError",
              "ClientPayloadError", "ServerTimeoutError", "ServerDisconnectedError")
_NOT_NO_ANSWER = ("ClientSSLError", "SSLError")  # (a certificate refused: it answered)
# the object stores' clients' errors for credentials found nowhere (botocore's, google-auth's)
NO_CREDENTIALS = ("NoCredentialsError", "DefaultCredentialsError")


def storage_cause(exc: BaseException) -> BaseException:
    """The error that says what the storage did, inside `exc`'s wrappers (a Ray task's error
    wraps the task's own, with its traceback in its text: `wrapped_errors`): the innermost
    one of a client's no-answer or no-credentials errors, else the innermost OSError, else
    `exc`; not inside a named error (a SemidError says what failed in its own words)."""
    chain = []
    for node in wrapped_errors(exc):
        if isinstance(node, SemidError):
            break
        chain.append(node)
    for names in (NO_ANSWER, NO_CREDENTIALS):
        if found := [e for e in chain if named(e, names)]:
            return found[-1]
    return next((e for e in reversed(chain) if isinstance(e, OSError)), exc)


def remote_failure(exc: BaseException) -> bool:
    """Whether `exc` came from a Ray task or worker (Ray's wrappers are among the errors
    it wraps): it failed on a node of the cluster, in that node's environment."""
    return any(type(e).__module__.split(".")[0] == "ray" for e in wrapped_errors(exc))


def credentials_advice(remote: bool) -> str:
    """Where to give an object store's credentials that were found nowhere: this machine's
    environment, or (`remote`: a Ray task's) the Ray workers'."""
    if remote:
        return ("give Ray's workers credentials for the object store: on a cluster, an "
                "instance role or the nodes' environment, or env_vars passed with the job (ray "
                "job submit --runtime-env-json '{\"env_vars\": {...}}'); an embedded Ray's "
                "workers read this environment as Ray starts: set them here (s3://: "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return ("give them in the environment (s3://: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE; gs://: GOOGLE_APPLICATION_CREDENTIALS) or run where the machine's "
            "role has them")


def no_answer(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps (a Ray task's), is an object store's client
    saying its server does not answer (refused, timed out, gone in the middle of a request)."""
    for node in wrapped_errors(exc):
        if named(node, _NOT_NO_ANSWER):
            return False
        if named(node, NO_ANSWER):
            return True
    return False


_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def refused_option(exc: BaseException) -> tuple[list[str], str] | None:
    """(protocols, option) when `exc`, or an error it wraps, is a file system's client
    refusing an option fsspec's configuration gives (`FSSPEC_S3='{"retries": 1}'`,
    `FSSPEC_S3_RETRIES`, a file in FSSPEC_CONFIG_DIR): a TypeError naming it, raised by the
    client's first request; the protocols whose configuration gives it (the error does not
    say whose client it is); else None."""
    for node in wrapped_errors(exc):
        found = _UNEXPECTED_KEYWORD.search(str(node))
        if not isinstance(node, TypeError) or found is None:
            continue
        protocols = [protocol for protocol, options in fsspec.config.conf.items()
                     if isinstance(options, dict) and found.group(1) in options]
        if protocols:
            return protocols, found.group(1)
    return None


def named(exc: BaseException, names: tuple[str, ...]) -> bool:
    """Whether `exc` is of a class called one of `names` (a client library's error, matched
    without importing the library)."""
    return any(c.__name__ in names for c in type(exc).__mro__)


def storage_failure(exc: BaseException) -> bool:
    """Whether `exc` is the storage's failing (an OSError: a full disk, a read-only mount
    ...; or a server that does not answer, `no_answer`), not a fault of the job's own."""
    return isinstance(exc, OSError) or no_answer(exc)


def failure_text(exc: BaseException) -> str:
    """A storage failure for a one-line message: an OSError's own text (it names its errno
    and file), another error's with its type (`EndpointConnectionError: Could not ...`)."""
    text = redact_url(one_line(exc))
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def no_answer_advice(url: str | None = None) -> str:
    """What to do when the storage of `url` (None: a storage the caller cannot name) does
    not answer."""
    if url is None:
        return "check its address (s3://: AWS_ENDPOINT_URL, or the bucket's region) and the network"
    protocol = fsspec.utils.get_protocol(url)
    where = {"s3": "AWS_ENDPOINT_URL, or the bucket's region", "s3a": "AWS_ENDPOINT_URL, or "
             "the bucket's region", "gs": "STORAGE_EMULATOR_HOST, if you use one",
             "gcs": "STORAGE_EMULATOR_HOST, if you use one"}.get(protocol, "its host and port")
    return f"check the storage's address ({where}) and the network"


# object stores: no folders (an s3fs `makedirs` creates a bucket that is not there)
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss")


def _make_parent(fs: AbstractFileSystem, path: str) -> None:
    """Create `path`'s folder where the file system has folders."""
    parent = posixpath.dirname(path)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if parent and not set(protocols) & set(_OBJECT_STORES):
        fs.makedirs(parent, exist_ok=True)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so the final name appears only complete (tmp + rename where possible)."""
    _make_parent(fs, path)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:  # (fsspec's mv, shutil.move, moves the file into a folder named `path`)
            fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        except OSError:  # a full disk, say: no part-written file is left behind
            with suppress(OSError):
                os.remove(tmp)
            raise
    else:  # object stores publish a PUT atomically
        fs.pipe_file(path, data)


@contextmanager
def staged_output(fs: AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """A local file to write `path`'s bytes into as they come, instead of holding them in
    memory: renamed to `path` (local filesystems) or uploaded there (any other) when the
    block ends, so the name appears only complete; a block that raises leaves nothing. The
    file's `name` is its local path."""
    parent = posixpath.dirname(path)
    _make_parent(fs, path)
    # beside `path` on a local filesystem (the rename stays on one device), else in the
    # system's temporary folder (TMPDIR); opened as a new file, so the umask sets its mode
    name = f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:12]}"
    tmp = posixpath.join(parent, name) if is_local(fs) else os.path.join(
        tempfile.gettempdir(), name)
    try:
        with open(tmp, "xb") as f:
            yield f
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.remove(tmp)


def read_parquet(fs: AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file the job wrote (`TableStore.write_table`: with page checksums, verified
    here); StoreError naming it where it is no Parquet file any more (truncated, overwritten,
    a page whose checksum fails)."""
    with damaged_parquet(path), parquet_file(fs, path) as pf:
        return pf.read(columns=columns)


@contextmanager
def parquet_file(fs: AbstractFileSystem, path: str) -> Iterator[pq.ParquetFile]:
    """`path` in `fs` as a ParquetFile that verifies page checksums, closed afterwards: a
    local file by Arrow's own reader, another through the file system's file object. Arrow's
    threads let go of a read's pages after it returned, and pages holding the bytes a Python
    file object gave them need the interpreter: one still doing so as the process exited
    aborted it (`terminate called without an active exception`, status 134: 3 of 16
    `semid versions diff` runs that failed just after their read)."""
    with ExitStack() as opened:
        source = path if is_local(fs) else opened.enter_context(fs.open(path, "rb"))
        yield opened.enter_context(pq.ParquetFile(source, page_checksum_verification=True))


@contextmanager
def damaged_parquet(path: str) -> Iterator[None]:
    """Arrow's error on a file that is not (all) Parquet (a bad footer: ArrowInvalid; a bad
    page: an OSError of Arrow's, which has no errno), as a StoreError naming `path`; the
    file system's own errors (a missing file, no access, no connection: with an errno, or
    of those kinds, which an object store's client raises without one) pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None or isinstance(exc, (  # (an object store's have no errno)
                ConnectionError, TimeoutError, FileNotFoundError, PermissionError,
                IsADirectoryError, NotADirectoryError)):
            raise
        raise StoreError(f"{redact_url(path)} cannot be read as Parquet ({one_line(exc)}): "
                         "the file is damaged; restore it, or build a new version") from None
    except pa.ArrowInvalid as exc:
        raise StoreError(f"{redact_url(path)} cannot be read as Parquet ({one_line(exc)}): "
                         "the file is damaged; restore it, or build a new version") from None


def shown_path(url: str, path: str) -> str:
    """A file of `url`'s file system (`path`, as fsspec lists it) as a user names it: with
    url's scheme where it has one (fsspec's paths drop it: `bucket/cat/part-0.parquet` for
    s3://bucket/cat/part-0.parquet), and its host where the file system's paths leave it
    out (ftp://host/..., hdfs://namenode:8020/...), credentials masked; a local path as it
    is. A chained URL: through a cache, its last link's file; inside an archive
    (`zip://a.parquet::s3://b/c.zip`), the member and the archive's URL."""
    links = url.split("::")
    first = links[0].split("://", 1)[0]  # (`simplecache`, or `zip://member`)
    if len(links) > 1 and first not in _CACHES:
        return redact_url(f"{first}://{path.lstrip('/')}::" + "::".join(links[1:]))
    last = links[-1]
    protocol = fsspec.utils.get_protocol(last)
    if protocol in ("file", "local") or "://" in path:
        return redact_url(path)
    host = urllib.parse.urlsplit(last).netloc if protocol in _HOST_PATHS else ""
    return redact_url(f"{protocol}://{host}/{path.lstrip('/')}" if host
                      else f"{protocol}://{path}")


# file systems whose paths leave out the URL's host (and user and port)
_HOST_PATHS = ("ftp", "sftp", "ssh", "hdfs", "viewfs", "webhdfs", "smb")
_CACHES = ("simplecache", "filecache", "blockcache", "cached")  # (a chain's file: the last's)


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether `fs` is the machine's own file system (its paths are OS paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
