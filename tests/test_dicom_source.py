"""The `dicom` data source on the DICOM files pydicom ships inside its wheel.

Only files bundled in the installed package are used (`download=False`:
nothing is fetched). A node operator registers a folder of them with a
label CSV through the real command line; the tests check the registration,
the quality report, the training data, the pixel pipeline against the
standard's formulas, malformed files, and that no header value of any of
the files reaches anything the node writes outside its data folder or
sends to the coordinator.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CliRunner, flower_context, one_cli_error
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence

from consortia.client.app import app
from consortia.client.onboarding import DatasetRegistry, load_spec
from consortia.client.onboarding.dicom_summary import Unusable
from consortia.client.onboarding.quality import QualityReport
from consortia.client.onboarding.validation import inspect
from consortia.common import protocol as p
from consortia.common.config import JobConfig
from consortia.common.errors import ConfigError
from consortia.common.models import build_model
from consortia.common.scaling import ScalingKind
from consortia.common.statistics import MESSAGE_TYPE as STATISTICS
from consortia.common.weights import model_to_arrays

DATASET = "scans"
CR = "dicomdirtests/77654033/CR{}/{}"
CT = "dicomdirtests/77654033/CT2/{}"
# Folder path -> (pydicom's bundled file, label): CT, MR, CR (MONOCHROME1), ultrasound
# RGB (big endian) and PALETTE COLOR, secondary captures in RGB (RLE, two frames) and
# YBR_FULL_422, and one CT series of four slices.
IMAGES = {
    "CT_small.dcm": ("CT_small.dcm", 0),
    "MR_small.dcm": ("MR_small.dcm", 1),
    "us/ExplVR_BigEnd.dcm": ("ExplVR_BigEnd.dcm", 0),
    "us/examples_palette.dcm": ("examples_palette.dcm", 1),
    "sc/SC_rgb_rle_2frame.dcm": ("SC_rgb_rle_2frame.dcm", 0),
    "sc/SC_ybr_full_422_uncompressed.dcm": ("SC_ybr_full_422_uncompressed.dcm", 1),
    "cr/6154": (CR.format(1, 6154), 0),
    "cr/6247": (CR.format(2, 6247), 1),
    "cr/6278": (CR.format(3, 6278), 0),
    "ct/17106": (CT.format(17106), 1),
    "ct/17136": (CT.format(17136), 0),
    "ct/17166": (CT.format(17166), 1),
    "ct/17196": (CT.format(17196), 0),
}
# Header fields that identify a patient, a study, a device or a site.
IDENTIFYING_VRS = {"PN", "LO", "SH", "UI", "DA", "DT", "AS", "LT", "ST", "UT"}

pytestmark = pytest.mark.usefixtures("task_identity")


def _bundled(name: str) -> Path:
    """A file inside pydicom's installed package; never downloaded."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not bundled with the installed pydicom"
    return Path(path)


def _folder(root: Path, images: dict[str, tuple[str, int]] = IMAGES) -> Path:
    scans = root / "scans"
    for target, (name, _) in images.items():
        (scans / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_bundled(name), scans / target)
    return scans


def _labels_csv(root: Path, rows: list[tuple[str, object]], header: str = "file,label") -> Path:
    path = root / "labels.csv"
    path.write_text(header + "\n" + "".join(f"{key},{label}\n" for key, label in rows))
    return path


def _schema(
    root: Path,
    source: str = "",
    top: str = "",
    size: tuple[int, int] = (32, 32),
    split: str = "test_fraction = 0.25\nseed = 1",
) -> Path:
    """dataset.toml of the folder `scans` and `labels.csv`; `source`/`top`/`split`: more lines."""
    path = root / "dataset.toml"
    path.write_text(
        f'{top}\n[source]\nformat = "dicom"\npath = "scans"\nlabels = "labels.csv"\n'
        f"size = [{size[0]}, {size[1]}]\n{source}\n\n[split]\n{split}\n"
    )
    return path


def _node_toml(root: Path, policy: str = "") -> Path:
    path = root / "node.toml"
    path.write_text(
        f'name = "st-mary"\nstate_dir = "state"\nserve = ["{DATASET}"]\n\n'
        f"[policy]\nepsilon_budget = 50.0\ndelta = 1e-5\n{policy}\n"
    )
    return path


def _add(cli: CliRunner, root: Path, schema: Path) -> subprocess.CompletedProcess[str]:
    node = root / "node.toml" if (root / "node.toml").exists() else _node_toml(root)
    return cli(
        "node", "data", "add", DATASET, "--config", str(schema), "--node", str(node), cwd=root
    )


def _site(cli: CliRunner, root: Path, source: str = "", top: str = "") -> Path:
    """The 13 bundled images labelled by file, registered through the CLI; returns the folder."""
    _folder(root)
    _labels_csv(root, [(target, label) for target, (_, label) in IMAGES.items()])
    added = _add(cli, root, _schema(root, source, top))
    assert added.returncode == 0, added.stdout + added.stderr
    return root


def _headers(scans: Path) -> list[Dataset]:
    """The headers of the folder's DICOM files (files that are not DICOM aside)."""
    headers = []
    for path in sorted(scans.rglob("*")):
        try:
            headers.append(pydicom.dcmread(path))
        except (InvalidDicomError, IsADirectoryError):
            continue
    return headers


# --------------------------------------------------------------- registration


def test_cli_registers_pydicom_files_with_a_quality_report(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    _folder(tmp_path)
    _labels_csv(tmp_path, [(target, label) for target, (_, label) in IMAGES.items()])
    added = _add(consortia_cli, tmp_path, _schema(tmp_path))
    assert added.returncode == 0, added.stdout + added.stderr
    assert "DICOM" in added.stdout and "photometric interpretations" in added.stdout

    registry = DatasetRegistry(tmp_path / "state")
    registration = registry.get(DATASET)
    assert registration.spec.source.format == "dicom"
    assert registration.records == len(IMAGES) == registration.train_records + 4
    assert registration.feature_shape == (1, 32, 32) and registration.num_classes == 2
    assert registration.scaling is not None and registration.scaling.kind == ScalingKind.FIXED
    assert "rescale slope and intercept" in registration.scaling.detail

    # The report's counts, against the headers as pydicom reads them.
    headers = _headers(tmp_path / "scans")
    report = registry.quality(DATASET)
    summary = report.dicom
    assert summary is not None and report.format == "dicom"
    assert summary.files == summary.images == summary.records == len(IMAGES)
    assert summary.unusable == {} and summary.unlabeled == summary.unmatched_label_rows == 0
    assert summary.modalities == dict(Counter(str(ds.Modality) for ds in headers))
    assert summary.photometric_interpretations == dict(
        Counter(str(ds.PhotometricInterpretation) for ds in headers)
    )
    assert summary.image_sizes == dict(Counter(f"{ds.Rows}x{ds.Columns}" for ds in headers))
    assert summary.multi_frame == sum(int(ds.get("NumberOfFrames") or 1) > 1 for ds in headers)
    monochrome = [ds for ds in headers if str(ds.PhotometricInterpretation).startswith("MONO")]
    expected_windowing = {
        "colour": len(headers) - len(monochrome),
        "file_window": sum("WindowCenter" in ds for ds in monochrome),
        "image_range": sum("WindowCenter" not in ds for ds in monochrome),
    }
    assert {k.value: v for k, v in summary.windowing.items()} == expected_windowing
    assert report.class_counts == {0: 7, 1: 6} and report.problems == 0

    # Training data: float32 on [0, 1], one channel, both classes.
    prepared = registry.load(DATASET)
    assert prepared.train.x.shape == (9, 1, 32, 32) and prepared.test.x.shape == (4, 1, 32, 32)
    assert prepared.train.x.dtype == np.float32 and prepared.train.y.dtype == np.int64
    both = np.concatenate([prepared.train.x, prepared.test.x])
    assert both.min() >= 0.0 and both.max() <= 1.0 and both.max() > 0.9
    assert set(prepared.train.y) | set(prepared.test.y) == {0, 1}

    checked = consortia_cli("node", "data", "check", DATASET, "--node", "node.toml", cwd=tmp_path)
    assert checked.returncode == 0 and "unchanged since registration" in checked.stdout


def test_rgb_mode_and_public_constants_plug_into_the_image_scaling(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    _site(consortia_cli, tmp_path, 'mode = "rgb"', "[normalize]\nmean = 0.5\nstd = 0.25\n")
    registry = DatasetRegistry(tmp_path / "state")
    registration = registry.get(DATASET)
    assert registration.feature_shape == (3, 32, 32)
    assert registration.scaling is not None and registration.scaling.kind == ScalingKind.PUBLIC
    assert registration.scaling.mean == (0.5,) * 3 and registration.scaling.std == (0.25,) * 3
    prepared = registry.load(DATASET)
    raw = inspect(registry.spec(DATASET)).records.x  # on [0, 1], before the constants
    both = np.concatenate([prepared.train.x, prepared.test.x])
    assert both.min() >= -2.0 and both.max() <= 2.0  # (x - 0.5) / 0.25 for x on [0, 1]
    assert np.allclose(np.sort(both.ravel()), np.sort((raw.ravel() - 0.5) / 0.25), atol=1e-6)
    # A grayscale image in rgb mode is the same in all three channels; a colour one is not.
    channels_differ = [not np.allclose(image[0], image[1]) for image in raw]
    assert sum(channels_differ) == 4  # RGB, PALETTE COLOR, RGB (RLE) and YBR_FULL_422


# ------------------------------------------------------------------ pixels


def _one_image(tmp_path: Path, name: str, size: tuple[int, int], source: str = "") -> np.ndarray:
    """One bundled file registered at its own size (no resampling): its image on [0, 1]."""
    _folder(tmp_path, {"image.dcm": (name, 0)})
    _labels_csv(tmp_path, [("image.dcm", 0)])
    records = inspect(load_spec(_schema(tmp_path, source, size=size))).records
    assert len(records.x) == 1
    image: np.ndarray = records.x[0]
    return image


def _dicom_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written as the standard writes it, onto [0, 1]."""
    out = ((values - (center - 0.5)) / (width - 1) + 0.5).astype(np.float64)
    out[values <= center - 0.5 - (width - 1) / 2] = 0.0
    out[values > center - 0.5 + (width - 1) / 2] = 1.0
    return out


def test_ct_rescale_slope_intercept_then_the_schema_window(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = _one_image(
        tmp_path, "CT_small.dcm", (128, 128), "window = { center = 40, width = 400 }"
    )
    assert np.allclose(image[0], _dicom_linear(hu, 40.0, 400.0), atol=1e-6)
    assert 0 < (image == 0).sum() < image.size  # air is below the window, tissue inside it


def test_mr_file_window_and_cr_monochrome1_inverted(tmp_path: Path) -> None:
    mr = pydicom.dcmread(_bundled("MR_small.dcm"))
    image = _one_image(tmp_path / "mr", "MR_small.dcm", (64, 64))
    expected = _dicom_linear(mr.pixel_array.astype(float), 600.0, 1600.0)
    assert np.allclose(image[0], expected, atol=1e-6)

    cr = pydicom.dcmread(_bundled(CR.format(1, 6154)))
    assert cr.PhotometricInterpretation == "MONOCHROME1"
    values = cr.pixel_array * float(cr.RescaleSlope) + float(cr.RescaleIntercept)
    center, width = float(cr.WindowCenter), float(cr.WindowWidth)
    image = _one_image(tmp_path / "cr", CR.format(1, 6154), (16, 16))
    assert np.allclose(image[0], 1.0 - _dicom_linear(values, center, width), atol=1e-6)


def test_a_voi_lut_sequence_comes_before_the_window(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_bundled("MR_small.dcm"))
    pixels = ds.pixel_array.astype(np.int64)
    first, entries = int(pixels.min()), 1024
    lut = [round(65535 * (i / (entries - 1)) ** 0.5) for i in range(entries)]  # a gamma curve
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", lut)  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    (tmp_path / "src").mkdir()
    ds.save_as(tmp_path / "src" / "voi.dcm")
    (tmp_path / "scans").mkdir()
    shutil.copyfile(tmp_path / "src" / "voi.dcm", tmp_path / "scans" / "voi.dcm")
    _labels_csv(tmp_path, [("voi.dcm", 1)])
    inspection = inspect(load_spec(_schema(tmp_path, size=(64, 64))))
    index = np.clip(pixels - first, 0, entries - 1)
    expected = np.asarray(lut, dtype=np.float64)[index] / 65535
    assert np.allclose(inspection.records.x[0, 0], expected, atol=1e-6)
    summary = inspection.records.raw.dicom
    assert summary is not None and {k.value: v for k, v in summary.windowing.items()} == {
        "voi_lut": 1
    }


def test_colour_images_to_grayscale_use_luma(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_bundled("ExplVR_BigEnd.dcm"))
    rgb = ds.pixel_array.astype(np.float64) / 255
    image = _one_image(tmp_path, "ExplVR_BigEnd.dcm", (int(ds.Rows), int(ds.Columns)))
    assert np.allclose(image[0], rgb @ [0.299, 0.587, 0.114], atol=1e-6)


# ------------------------------------------------------------------ series


def test_one_record_per_series_is_its_middle_slice(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    series = {
        target: value for target, value in IMAGES.items() if target.startswith(("ct/", "cr/"))
    }
    by_file = tmp_path / "by-file"
    _folder(by_file, series)
    _labels_csv(by_file, [(target, 0) for target in series])
    # A window wide enough that the four CT slices differ (the files' own 30/100 turns
    # three of them white).
    window = "window = { center = 200, width = 3000 }"
    added = _add(consortia_cli, by_file, _schema(by_file, window))
    assert added.returncode == 0, added.stderr
    images = inspect(DatasetRegistry(by_file / "state").spec(DATASET)).records.x
    image_of = dict(zip(sorted(series), images, strict=True))

    by_series = tmp_path / "by-series"
    scans = _folder(by_series, series)
    uids = {
        path.relative_to(scans).as_posix(): str(pydicom.dcmread(path).SeriesInstanceUID)
        for path in scans.rglob("*")
        if path.is_file()
    }
    labels = {uid: k % 2 for k, uid in enumerate(sorted(set(uids.values())))}
    _labels_csv(by_series, sorted(labels.items()), header="series_uid,label")
    source = f'{window}\nunit = "series"\nkey = "series"\nkey_column = "series_uid"'
    added = _add(consortia_cli, by_series, _schema(by_series, source, split="test_fraction = 0.5"))
    assert added.returncode == 0, added.stderr
    registry = DatasetRegistry(by_series / "state")
    summary = registry.quality(DATASET).dicom
    assert summary is not None and summary.records == len(labels) == 4  # 3 CR, 1 CT series
    records = inspect(registry.spec(DATASET)).records

    # The CT series: its slices ordered along their normal (axial here: by z), the middle one.
    ct = sorted(
        (t for t in series if t.startswith("ct/")),
        key=lambda t: float(pydicom.dcmread(scans / t).ImagePositionPatient[2]),
    )
    middle = ct[len(ct) // 2]
    record_of_uid = {
        uid: records.x[k] for k, uid in enumerate(sorted({uids[t] for t in sorted(series)}))
    }
    assert np.array_equal(record_of_uid[uids[middle]], image_of[middle])
    assert sum(np.array_equal(record_of_uid[uids[middle]], image_of[t]) for t in ct) == 1


def test_labels_by_patient_reach_every_image_of_the_patient(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    scans = _folder(tmp_path)
    patients = sorted({str(ds.get("PatientID", "")) for ds in _headers(scans)} - {""})
    # One patient is left without a row: its images are left out and counted.
    labelled = {pid: k % 2 for k, pid in enumerate(patients[1:])}
    _labels_csv(tmp_path, [*labelled.items(), ("no-such-patient", 1)], header="patient,label")
    schema = _schema(tmp_path, 'key = "patient"')
    # The ultrasound file has no Patient ID: no row can name it.
    message = one_cli_error(_add(consortia_cli, tmp_path, schema), nothing_on_stdout=True)
    assert "1 problem" in message
    assert f"{scans / 'us' / 'ExplVR_BigEnd.dcm'}: has no Patient ID (0010,0020)" in message
    assert 'use key = "file"' in message

    values = _header_values(scans)
    (scans / "us" / "ExplVR_BigEnd.dcm").unlink()
    added = _add(consortia_cli, tmp_path, schema)
    assert added.returncode == 0, added.stderr
    # The label file holds Patient IDs; none reaches the terminal or the node's files.
    written = [path.read_text() for path in (tmp_path / "state").rglob("*.json")]
    texts = [message, added.stdout, added.stderr, *written]
    assert not [v for v in values if any(v in text for text in texts)]
    summary = DatasetRegistry(tmp_path / "state").quality(DATASET).dicom
    headers = _headers(scans)
    left_out = sum(str(ds.PatientID) == patients[0] for ds in headers)
    assert summary is not None and left_out > 0
    assert summary.records == len(headers) - left_out and summary.unlabeled == left_out
    assert summary.label_rows == len(labelled) + 1 and summary.unmatched_label_rows == 1


# ------------------------------------------------------------------ privacy


def _header_values(scans: Path) -> set[str]:
    """Every identifying header value of the files (names, IDs, UIDs, dates, institutions...)."""
    found: set[str] = set()
    for ds in _headers(scans):
        elements = [*ds.file_meta.iterall(), *ds.iterall()]
        for element in elements:
            if element.VR not in IDENTIFYING_VRS or element.value is None:
                continue
            values = element.value if element.VM > 1 else [element.value]
            found.update(str(v).strip() for v in values)
        found.update({str(ds.get("PatientID", "")).strip(), str(ds.get("PatientName", ""))})
    # Values that could occur by chance in a hash, a number or a timestamp ("000000000",
    # "1") are left out; names, IDs, UIDs and dates remain.
    return {
        v for v in found if len(set(v)) >= 3 and (len(v) >= 6 or (len(v) >= 4 and not v.isdigit()))
    }


def _reply_texts(reply: Message) -> list[bytes]:
    assert not reply.has_error(), reply.error.reason
    texts = []
    for name, record in reply.content.items():
        texts.append(name.encode())
        for key, value in record.items():
            texts.append(key.encode())
            data = getattr(value, "data", None)
            texts.append(data if isinstance(data, bytes) else repr(value).encode())
    return texts


def test_no_header_value_leaves_the_node_or_its_data_folder(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    _node_toml(tmp_path, "answer_statistics = true\nmax_statistics_epsilon = 1.0\n")
    (tmp_path / "data").mkdir()
    scans = _folder(tmp_path / "data")
    (tmp_path / "data" / "labels.csv").write_text(
        "file,label\n" + "".join(f"{t},{label}\n" for t, (_, label) in IMAGES.items())
    )
    schema = _schema(tmp_path / "data")
    values = _header_values(scans)
    assert {"CompressedSamples^CT1", "1CT1", "Doe^Archibald", "77654033"} <= values
    assert any(v.startswith("1.3.6.1.4.1.5962.") for v in values)  # the files' UIDs

    outputs: list[bytes] = []
    for args in (
        ("node", "data", "add", DATASET, "--config", str(schema), "--node", "node.toml"),
        ("node", "data", "check", DATASET, "--node", "node.toml"),
        ("node", "data", "list", "--node", "node.toml"),
    ):
        done = consortia_cli(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs += [done.stdout.encode(), done.stderr.encode()]

    # What the node sends: its roster identity, a DP training round, an evaluation, statistics.
    registration = DatasetRegistry(tmp_path / "state").get(DATASET)
    job = JobConfig.model_validate(
        {
            "name": "dicom-privacy",
            "dataset": DATASET,
            "min_nodes": 1,
            "rounds": 1,
            "seed": 5,
            "model": {"name": "cnn"},
            "training": {"batch_size": 4, "learning_rate": 0.1},
            "privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "statistics": {"target_epsilon": 0.5, "min_count": 0},
        }
    )
    model = build_model(job.model, registration.feature_shape, registration.num_classes, job.seed)

    def ask(message_type: str, run_id: int) -> Message:
        config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
        content = RecordDict({p.ARRAYS_KEY: model_to_arrays(model), p.CONFIG_KEY: config})
        request = Message(content, dst_node_id=7, message_type=message_type)
        return app(request, flower_context(node_toml=tmp_path / "node.toml", run_id=run_id))

    for run_id, message_type in enumerate(
        (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE, STATISTICS), start=61
    ):
        reply = ask(message_type, run_id)
        assert p.read_refusal(reply.content) is None, p.read_refusal(reply.content)
        assert message_type != MessageType.TRAIN or p.ARRAYS_KEY in reply.content  # an update
        outputs += _reply_texts(reply)

    # A file changed after registration: the refusal names the folder, not the file.
    ds = pydicom.dcmread(scans / "MR_small.dcm")
    ds.WindowWidth = 800
    ds.save_as(scans / "MR_small.dcm")
    refused = ask(MessageType.TRAIN, 65)
    refusal = p.read_refusal(refused.content)
    assert refusal is not None and refusal[0] == p.RefusalCode.DATA_UNUSABLE
    assert "the data changed since dataset 'scans' was registered" in refusal[1]
    assert "MR_small" not in refusal[1]
    outputs += _reply_texts(refused)

    # Everything the node wrote outside its data folder: registration, quality report,
    # the schema copy, audit log, ledger.
    written = [path for path in (tmp_path / "state").rglob("*") if path.is_file()]
    assert {"registration.json", "quality.json"} <= {path.name for path in written}
    outputs += [path.read_bytes() for path in written]
    for value in sorted(values):
        leaks = [k for k, text in enumerate(outputs) if value.encode() in text]
        assert not leaks, f"header value {value!r} found in output {leaks}"


# --------------------------------------------------------------- bad files


def test_malformed_and_non_image_files_are_named_in_one_message(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    scans = _folder(tmp_path, {"CT_small.dcm": ("CT_small.dcm", 0), "MR.dcm": ("MR_small.dcm", 1)})
    shutil.copyfile(_bundled("MR_truncated.dcm"), scans / "MR_truncated.dcm")  # pixels cut short
    (scans / "cut.dcm").write_bytes(_bundled("CT_small.dcm").read_bytes()[:5000])  # header cut
    shutil.copyfile(_bundled("test-SR.dcm"), scans / "report.dcm")  # a structured report
    (scans / "notes.dcm").write_text("Findings: see the attached images.\n")  # text, not DICOM
    _labels_csv(tmp_path, [("CT_small.dcm", 0), ("MR.dcm", 1)])
    result = _add(consortia_cli, tmp_path, _schema(tmp_path))
    message = one_cli_error(result, nothing_on_stdout=True)
    assert f"dataset '{DATASET}' was not registered" in message and "4 problems" in message
    for name, what, fix in (
        ("MR_truncated.dcm", "a truncated or damaged DICOM file", "export the file again"),
        ("cut.dcm", "a truncated or damaged DICOM file", "export the file again"),
        ("report.dcm", "a DICOM object without an image", "skip_non_images = true"),
        ("notes.dcm", "not a DICOM file", "remove it from the folder"),
    ):
        assert f"{scans / name}: {what}" in message and fix in message
    assert "CT_small.dcm:" not in message and "MR.dcm:" not in message
    state = tmp_path / "state"
    assert not state.exists() or not any(state.rglob("*"))  # nothing registered, no staging
    values = _header_values(scans)
    assert not [v for v in values if v in result.stdout + result.stderr]


def test_undecodable_and_unsupported_pixels_say_why(tmp_path: Path) -> None:
    """JPEG-LS needs a decoder plugin; a photometric interpretation outside the supported set,
    or one that is no standard name at all (never repeated), is refused before decoding."""
    scans = _folder(tmp_path, {"jpeg-ls.dcm": ("MR_small_jpeg_ls_lossless.dcm", 0)})
    ds = pydicom.dcmread(_bundled("SC_rgb_rle_2frame.dcm"))
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.save_as(scans / "partial.dcm")
    with pytest.warns(UserWarning, match="Smith"):  # pydicom's warnings quote header values
        ds.PhotometricInterpretation = "Smith^Jane"
    ds.save_as(scans / "odd.dcm")
    _labels_csv(tmp_path, [("jpeg-ls.dcm", 0), ("partial.dcm", 1), ("odd.dcm", 1)])
    inspection = inspect(load_spec(_schema(tmp_path)))
    message = inspection.problems.message("check")
    summary = inspection.records.raw.dicom
    assert summary is not None and len(inspection.records) == 0
    syntax = pydicom.dcmread(_bundled("MR_small_jpeg_ls_lossless.dcm")).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:  # a JPEG-LS plugin is installed: it decodes
        assert "jpeg-ls.dcm" not in message and summary.images == 1
    else:
        assert f"{scans / 'jpeg-ls.dcm'}: its pixel data is compressed with a transfer" in message
        assert "pip install pylibjpeg" in message
        assert summary.unusable.get(Unusable.NO_DECODER) == 1
    assert f"{scans / 'partial.dcm'}: its photometric interpretation (YBR_PARTIAL_420)" in message
    assert f"{scans / 'odd.dcm'}: its photometric interpretation (an unknown one)" in message
    assert "Smith" not in message and summary.unusable.get(Unusable.UNSUPPORTED) == 2


def test_skip_non_images_counts_them_in_the_report(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    images = {"CT_small.dcm": ("CT_small.dcm", 0), "MR.dcm": ("MR_small.dcm", 1)}
    images |= {"cr1": (CR.format(1, 6154), 0), "cr2": (CR.format(2, 6247), 1)}
    scans = _folder(tmp_path, images)
    for name in ("test-SR.dcm", "rtplan.dcm"):
        shutil.copyfile(_bundled(name), scans / name)
    (scans / "DICOMDIR").write_bytes(_bundled("dicomdirtests/DICOMDIR").read_bytes())  # an index
    _labels_csv(tmp_path, [(target, label) for target, (_, label) in images.items()])
    schema = _schema(tmp_path, "skip_non_images = true", split="test_fraction = 0.5")
    added = _add(consortia_cli, tmp_path, schema)
    assert added.returncode == 0, added.stderr
    summary = DatasetRegistry(tmp_path / "state").quality(DATASET).dicom
    assert summary is not None and summary.files == 6 and summary.images == 4  # DICOMDIR aside
    assert {k.value: v for k, v in summary.unusable.items()} == {"no_pixels": 2}
    assert summary.skipped == 2 and summary.records == 4
    assert "unusable: no pixels (skipped)" in added.stdout


@pytest.mark.parametrize(
    ("labels", "source", "fragments"),
    [
        pytest.param(
            "id,label\nCT_small.dcm,0\n",
            "",
            ["labels.csv: row 1: its header has no column 'file' (of 2 columns)", "key_column"],
            id="no key column",
        ),
        pytest.param(
            "file,label\nCT_small.dcm,0\nMR.dcm,1\nCT_small.dcm,1\n",
            "",
            ["labels.csv: row 4, column 'file': names the same file as row 2"],
            id="duplicate identifier",
        ),
        pytest.param(
            "patient,label\nCT_small.dcm,0\nMR.dcm,1\n",
            'key = "patient"',
            ["none of its 2 label rows names one of the 2 images", "check 'key' and 'key_column'"],
            id="wrong key",
        ),
        pytest.param(
            "file,label\nCT_small.dcm,benign\nMR.dcm,malignant\n",
            "",
            ["labels.csv: column 'label': the labels are text", "add a [label_mapping]"],
            id="text labels without a mapping",
        ),
        pytest.param(
            "file,label\nCT_small.dcm,0\nMR.dcm,7\n",
            'label_mapping = { "0" = 0, "1" = 1 }',
            ["labels.csv: row 3, column 'label': label '7' is not in [label_mapping]"],
            id="label outside the mapping",
        ),
    ],
)
def test_label_file_problems(
    tmp_path: Path, consortia_cli: CliRunner, labels: str, source: str, fragments: list[str]
) -> None:
    scans = _folder(tmp_path, {"CT_small.dcm": ("CT_small.dcm", 0), "MR.dcm": ("MR_small.dcm", 1)})
    (tmp_path / "labels.csv").write_text(labels)
    top = source if source.startswith("label_mapping") else ""
    schema = _schema(tmp_path, "" if top else source, top)
    message = one_cli_error(_add(consortia_cli, tmp_path, schema), nothing_on_stdout=True)
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "state" / "datasets" / DATASET).exists()
    assert not [v for v in _header_values(scans) if v in message]


def test_schema_refuses_a_file_key_per_series_and_columns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='key = "file" labels single files'):
        load_spec(_schema(tmp_path, 'unit = "series"'))
    schema = _schema(tmp_path)
    columns = '[[columns]]\nname = "x"\ntype = "float"\n\n[[columns]]\nname = "y"\ntype = "int"\n'
    schema.write_text(schema.read_text() + columns + "label = true\n")
    with pytest.raises(ConfigError, match="a dicom source takes none"):
        load_spec(schema)


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_follows_pixels_and_labels_not_patient_names(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    _site(consortia_cli, tmp_path)
    registry = DatasetRegistry(tmp_path / "state")
    registered = registry.get(DATASET).fingerprint
    path = tmp_path / "scans" / "CT_small.dcm"
    original = path.read_bytes()

    ds = pydicom.dcmread(path)
    ds.PatientName = "Renamed^Patient"  # a header edit the model never sees
    ds.save_as(path)
    assert registry.check(DATASET).records == len(IMAGES)  # unchanged: no error

    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 100  # one pixel of the image
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    with pytest.raises(Exception, match="the data changed since dataset 'scans' was registered"):
        registry.check(DATASET)
    path.write_bytes(original)
    assert registry.get(DATASET).fingerprint == registered
    registry.check(DATASET)
    (tmp_path / "scans" / "extra.dcm").write_bytes(original)  # a new, unlabelled file
    with pytest.raises(Exception, match="the data changed"):
        registry.check(DATASET)


def test_quality_report_round_trips(tmp_path: Path, consortia_cli: CliRunner) -> None:
    _site(consortia_cli, tmp_path)
    path = tmp_path / "state" / "datasets" / DATASET / "quality.json"
    report = QualityReport.read(path)
    assert report.dicom is not None
    assert json.loads(path.read_text())["dicom"]["unit"] == "image"
