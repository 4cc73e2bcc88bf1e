"""DICOMweb: series and studies on a PACS as inputs (QIDO-RS, WADO-RS) and results sent back (STOW-RS).

An input URL names a study or one of its series::

    http(s)://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]

A series is downloaded into a temporary folder, read there exactly as a local series folder and
the folder removed, whatever happens. Credentials come from the environment, never from the
command line (where every user of the machine could read them in the process list):
``MEDFM_DICOMWEB_TOKEN`` (a bearer token) or ``MEDFM_DICOMWEB_USER`` and
``MEDFM_DICOMWEB_PASSWORD`` (HTTP basic authentication).

Every answer of the server is untrusted: UIDs are checked before they go into a URL, instance
counts and image sizes before anything is downloaded, and every failure is one
:class:`DicomWebError` line naming the URL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ..errors import MedfmError

__all__ = ["DICOMWEB_PASSWORD_ENV", "DICOMWEB_TOKEN_ENV", "DICOMWEB_USER_ENV", "DicomWebError", "DicomWebLocation",
           "adopt_url_credentials", "redact_credentials",
           "RemoteSeries", "absolute_input", "downloaded", "image_series", "is_dicomweb_url", "series_headers",
           "service_root", "store_instances"]

DICOMWEB_TOKEN_ENV = "MEDFM_DICOMWEB_TOKEN"
DICOMWEB_USER_ENV = "MEDFM_DICOMWEB_USER"
DICOMWEB_PASSWORD_ENV = "MEDFM_DICOMWEB_PASSWORD"
#: Seconds to wait for the server to answer one request.
TIMEOUT_S = 60.0
#: Attempts per request (waits of 1 s and 2 s between them).
RETRY_ATTEMPTS = 3

#: A DICOM UID: dot-separated numbers, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PATH = re.compile(r"^(?P<base>.*?)/studies/(?P<study>[^/]+)(/series/(?P<series>[^/]+))?/?$")
#: DICOM attributes asked of QIDO-RS (tags as hex, as DICOM JSON names them).
_SOP_CLASS, _ROWS, _COLUMNS, _FRAMES = "00080016", "00280010", "00280011", "00280008"
_SERIES_UID, _MODALITY, _DESCRIPTION = "0020000E", "00080060", "0008103E"
_STUDY_UID, _SOP_INSTANCE = "0020000D", "00080018"
#: Results asked of QIDO-RS per request; the next page is asked until one comes back empty, since servers
#: page big answers at their own limit too.
QIDO_PAGE = 1000


class DicomWebError(MedfmError):
    """A DICOMweb request that cannot give what was asked, in one line naming the URL."""


def is_dicomweb_url(value: object) -> bool:
    """Whether an input names a DICOMweb resource (``http://`` or ``https://``) rather than a file."""
    return str(value).lower().startswith(("http://", "https://"))


def absolute_input(source: str | os.PathLike) -> str:
    """An input's one name: a URL without credentials (:func:`adopt_url_credentials`), a path made absolute
    (``a/../b`` and ``b`` are one input)."""
    text = str(source)
    return adopt_url_credentials(text) if is_dicomweb_url(text) else os.path.abspath(os.path.expanduser(text))


_USERINFO = re.compile(r"(?i)\b(https?://)[^/\s@]*@")


def redact_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every http(s) URL in it removed (for reports and messages)."""
    return _USERINFO.sub(r"\1", text)


def adopt_url_credentials(url: str) -> str:
    """``url`` without its ``user:password@``; those credentials become the run's basic authentication (as if
    set in MEDFM_DICOMWEB_USER and MEDFM_DICOMWEB_PASSWORD, which DataLoader workers inherit), so that no
    output, log or message holds them. Credentials that differ from ones already set are refused."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    clean = urlunsplit(parts._replace(netloc=host))
    user, _, password = (unquote(part) for part in userinfo.partition(":"))
    if not user or not password:
        raise DicomWebError(f"{clean}: the URL holds a user name or a password, not both; give user:password@, or set "
                            f"{DICOMWEB_USER_ENV} and {DICOMWEB_PASSWORD_ENV}")
    set_before = (os.environ.get(DICOMWEB_USER_ENV, ""), os.environ.get(DICOMWEB_PASSWORD_ENV, ""))
    if os.environ.get(DICOMWEB_TOKEN_ENV) or (any(set_before) and set_before != (user, password)):
        raise DicomWebError(f"{clean}: the URL's credentials differ from those already given (another URL, or "
                            f"{DICOMWEB_TOKEN_ENV} / {DICOMWEB_USER_ENV}); a run sends one set of credentials")
    os.environ[DICOMWEB_USER_ENV], os.environ[DICOMWEB_PASSWORD_ENV] = user, password
    return clean


@dataclass(frozen=True)
class DicomWebLocation:
    """A study, or one of its series, on a DICOMweb server (``base_url``: the service root)."""

    base_url: str
    study_uid: str
    series_uid: str | None = None

    @classmethod
    def parse(cls, url: str) -> DicomWebLocation:
        from urllib.parse import urlsplit

        parts = urlsplit(str(url))
        if "@" in parts.netloc:
            return cls.parse(adopt_url_credentials(str(url)))
        match = _PATH.match(parts.path)
        if parts.scheme not in ("http", "https") or not parts.netloc or match is None or parts.query or parts.fragment:
            raise DicomWebError(f"{url}: not a DICOMweb study or series URL; give "
                                "http(s)://HOST[:PORT]/PREFIX/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]")
        for uid in (match["study"], match["series"]):
            if uid is not None and not _is_uid(uid):
                raise DicomWebError(f"{url}: {uid!r} is not a DICOM UID (dot-separated numbers, at most 64 characters)")
        return cls(f"{parts.scheme}://{parts.netloc}{match['base']}", match["study"], match["series"])

    @property
    def url(self) -> str:
        series = f"/series/{self.series_uid}" if self.series_uid else ""
        return f"{self.base_url}/studies/{self.study_uid}{series}"

    def series(self, series_uid: str) -> DicomWebLocation:
        return DicomWebLocation(self.base_url, self.study_uid, series_uid)


@dataclass(frozen=True)
class RemoteSeries:
    """An image series found on the server: where it is, its instances, and its voxel count (from QIDO-RS)."""

    location: DicomWebLocation
    instances: int
    voxels: int
    modality: str = ""
    description: str = ""

    def summary(self) -> str:
        what = " ".join(part for part in (self.modality, repr(self.description) if self.description else "") if part)
        return f"{self.location.series_uid} ({what + ', ' if what else ''}{self.instances} instances)"


def _is_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.match(value) is not None


def _session():
    """A requests session carrying the credentials of the environment (none when unset)."""
    import requests

    session = requests.Session()
    token = os.environ.get(DICOMWEB_TOKEN_ENV, "")
    user, password = os.environ.get(DICOMWEB_USER_ENV, ""), os.environ.get(DICOMWEB_PASSWORD_ENV, "")
    if token and (user or password):
        raise DicomWebError(f"set either {DICOMWEB_TOKEN_ENV} or {DICOMWEB_USER_ENV} and {DICOMWEB_PASSWORD_ENV}, "
                            "not both: which credentials to send would be a guess")
    if bool(user) != bool(password):
        raise DicomWebError(f"{DICOMWEB_USER_ENV} and {DICOMWEB_PASSWORD_ENV} go together: set both for basic authentication")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password)
    return session


def _client(base_url: str):
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url=base_url, session=_session(), timeout=TIMEOUT_S)
    # busy answers (429, 408, 503, 504) and failed connections are retried, but for seconds: the
    # client's default backs off for half a minute before a server that is down gets reported
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=500)
    return client


@contextlib.contextmanager
def _answers(url: str) -> Iterator[None]:
    """Turn the ways a server fails (down, slow, refusing, missing, malformed) into one line naming ``url``."""
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        reason = error.response.reason if error.response is not None else ""
        if status in (401, 403):
            raise DicomWebError(f"{url}: the DICOMweb server refused access (HTTP {status} {reason}); set "
                                f"{DICOMWEB_TOKEN_ENV}, or {DICOMWEB_USER_ENV} and {DICOMWEB_PASSWORD_ENV}, "
                                "to credentials it accepts") from None
        if status == 404:
            raise DicomWebError(f"{url}: not found on the DICOMweb server (HTTP 404)") from None
        raise DicomWebError(f"{url}: the DICOMweb server answered HTTP {status} {reason}".rstrip()) from None
    except requests.exceptions.Timeout:
        raise DicomWebError(f"{url}: the DICOMweb server did not answer within {TIMEOUT_S:g} s") from None
    except requests.exceptions.ConnectionError as error:
        reason = _connection_reason(error)
        raise DicomWebError(f"{url}: cannot reach the DICOMweb server ({reason})") from None
    except requests.exceptions.RequestException as error:
        raise DicomWebError(f"{url}: DICOMweb request failed ({type(error).__name__})") from None
    except (ValueError, KeyError, TypeError) as error:  # a malformed answer (JSON, multipart, DICOM)
        raise DicomWebError(f"{url}: the DICOMweb server's answer cannot be read ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else 'malformed'})") from None


def _connection_reason(error: BaseException) -> str:
    """The reason inside a connection failure (``Connection refused``, a name that does not resolve):
    requests nests it in the text of urllib3's error."""
    text = str(error)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return match.group(1).strip() if match else type(error).__name__


def _value(attributes: dict, tag: str, default=None):
    """The first value of ``tag`` in one DICOM JSON object (QIDO-RS answer), or ``default``."""
    element = attributes.get(tag) if isinstance(attributes, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else default


def _count(value, url: str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DicomWebError(f"{url}: the server gave {name} {value!r}, not a number") from None
    if number < 0:
        raise DicomWebError(f"{url}: the server gave a negative {name} ({number})")
    return number


def _all_pages(search, url: str, key: str, what: str) -> list[dict]:
    """Every result of a QIDO-RS search, page after page (``search(limit=..., offset=...)``), each UID once;
    a server that ignores ``offset`` (its next page repeats the first) ends the paging instead of looping."""
    results: list[dict] = []
    seen: set[str] = set()
    while True:
        with _answers(url):
            page = search(limit=QIDO_PAGE, offset=len(results))
        if not isinstance(page, list):
            raise DicomWebError(f"{url}: the server's {what} list is not a list")
        fresh = [item for item in page if str(_value(item, key, "")) not in seen]
        if not fresh:
            return results
        seen.update(str(_value(item, key, "")) for item in fresh)
        results.extend(fresh)


def _image_series(client, location: DicomWebLocation, attributes: dict | None = None) -> RemoteSeries | str:
    """The series at ``location`` as a :class:`RemoteSeries`, or (a string) why it is not an image series."""
    url = location.url
    instances = _all_pages(lambda **page: client.search_for_instances(
        location.study_uid, location.series_uid, fields=[_SOP_CLASS, _SOP_INSTANCE, _ROWS, _COLUMNS, _FRAMES], **page),
        url, _SOP_INSTANCE, "instance")
    if not instances:
        raise DicomWebError(f"{url}: no such series on the DICOMweb server (it lists no instances there)")
    classes = {str(_value(instance, _SOP_CLASS, "")) for instance in instances}
    others = sorted(uid for uid in classes if not _is_image_storage(uid))
    if others:
        names = ", ".join(pydicom.uid.UID(uid).name if _is_uid(uid) else repr(uid) for uid in others)
        return f"{location.series_uid} holds {names} instances, not images"
    voxels = sum(_count(_value(i, _ROWS, 0), url, "Rows") * _count(_value(i, _COLUMNS, 0), url, "Columns")
                 * max(1, _count(_value(i, _FRAMES, 1), url, "NumberOfFrames")) for i in instances)
    attributes = attributes or {}
    return RemoteSeries(location, len(instances), voxels, str(_value(attributes, _MODALITY, "") or ""),
                        str(_value(attributes, _DESCRIPTION, "") or ""))


def _is_image_storage(sop_class_uid: str) -> bool:
    """Image storage SOP classes (CT, MR, PET, secondary capture, their enhanced forms...), as PS3.4 names them."""
    name = pydicom.uid.UID(sop_class_uid).name if _is_uid(sop_class_uid) else ""
    return name.endswith("Image Storage") and "Presentation" not in name


def image_series(url: str, series_uid: str | None = None) -> list[RemoteSeries]:
    """The image series a URL names: the series itself, or each image series of a study (``series_uid``
    picks one of them). Non-image series of a study (segmentations, reports, presentation states) are
    left out; a series URL or ``series_uid`` naming one is an error, as is a study with no image series."""
    location = DicomWebLocation.parse(url)
    if series_uid and location.series_uid and series_uid != location.series_uid:
        raise DicomWebError(f"{url}: names series {location.series_uid}, but series_uid is {series_uid}")
    if series_uid:
        if not _is_uid(series_uid):
            raise DicomWebError(f"{url}: series_uid {series_uid!r} is not a DICOM UID")
        location = location.series(series_uid)
    client = _client(location.base_url)
    if location.series_uid:
        found = _image_series(client, location)
        if isinstance(found, str):
            raise DicomWebError(f"{location.url}: series {found}; give an image series")
        return [found]
    listed = _all_pages(lambda **page: client.search_for_series(
        location.study_uid, fields=[_SERIES_UID, _MODALITY, _DESCRIPTION], **page), url, _SERIES_UID, "series")
    if not listed:
        raise DicomWebError(f"{url}: no such study on the DICOMweb server (it lists no series there)")
    found, skipped = [], []
    for attributes in listed:
        uid = str(_value(attributes, _SERIES_UID, ""))
        if not _is_uid(uid):
            raise DicomWebError(f"{url}: the server listed a series UID {uid!r} that is not a DICOM UID")
        series = _image_series(client, location.series(uid), attributes)
        (skipped if isinstance(series, str) else found).append(series)
    if not found:
        raise DicomWebError(f"{url}: the study has no image series ({'; '.join(skipped)})")
    return found


@contextlib.contextmanager
def downloaded(series: Sequence[RemoteSeries]) -> Iterator[Path]:
    """A temporary folder holding the instances of ``series`` (WADO-RS), removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="medfm-dicomweb-"))
    try:
        for number, remote in enumerate(series):
            client = _client(remote.location.base_url)
            url = remote.location.url
            count = 0
            with _answers(url):
                for count, dataset in enumerate(client.iter_series(remote.location.study_uid, remote.location.series_uid), 1):
                    if count > remote.instances:  # a server that sends more than it listed is not trusted further
                        raise DicomWebError(f"{url}: the server sent more instances than the {remote.instances} it listed")
                    sent = (str(dataset.get("StudyInstanceUID", "")), str(dataset.get("SeriesInstanceUID", "")))
                    if sent != (remote.location.study_uid, remote.location.series_uid):
                        raise DicomWebError(f"{url}: the server sent an instance of series {sent[1] or '(none)'} of study "
                                            f"{sent[0] or '(none)'} for this series; its answer is not used")
                    dataset.save_as(folder / f"{number:03d}-{count:06d}.dcm")
            if count == 0:
                raise DicomWebError(f"{url}: the server sent no instances of the series")
            if count < remote.instances:
                raise DicomWebError(f"{url}: the server sent {count} of the {remote.instances} instances it listed; "
                                    "a scan is not built from part of its series")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def series_headers(url: str, series_uid: str) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of series ``series_uid`` of the study or series ``url`` names (WADO-RS
    metadata), e.g. for a DICOM-SEG that refers to them."""
    location = DicomWebLocation.parse(url).series(series_uid)
    client = _client(location.base_url)
    with _answers(location.url):
        metadata = client.retrieve_series_metadata(location.study_uid, location.series_uid)
        # bulk data (pixels, large private tags) stays on the server: a reference needs the headers only
        return [pydicom.Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"") for item in metadata]


def store_instances(url: str, files: Sequence[str | os.PathLike]) -> list[str]:
    """Send DICOM files to the server at ``url`` (its DICOMweb root, or any study/series URL on it) with
    STOW-RS; returns the SOP instance UIDs the server stored, after checking it stored them all."""
    base = service_root(url)
    datasets = [pydicom.dcmread(path) for path in files]
    client = _client(base)
    with _answers(base):
        answer = client.store_instances(datasets)
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed is not None and len(failed):
        raise DicomWebError(f"{base}: the server refused {len(failed)} of {len(datasets)} instance(s) sent with STOW-RS")
    return [str(dataset.SOPInstanceUID) for dataset in datasets]


def service_root(url: str) -> str:
    """The DICOMweb root of a study or series URL, or the URL itself when it names the root."""
    from urllib.parse import urlsplit

    url = adopt_url_credentials(url)
    if "/studies/" in url:
        return DicomWebLocation.parse(url).base_url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise DicomWebError(f"{url}: not a DICOMweb URL; give http(s)://HOST[:PORT]/PREFIX (the server's DICOMweb root)")
    return url.rstrip("/")
