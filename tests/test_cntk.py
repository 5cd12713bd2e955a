"""The CNTK v2 reader and the import of the 2018 tutorial's models into the seed network.

Wire-format tests build protobuf bytes by hand; the import tests read the two published models
from ../shared and skip where it is absent. The accuracy floors are set so that a plausible
mis-mapping (kernels with input and output channels swapped, values read in the wrong order)
falls far below them, which the negative controls check.
"""

from __future__ import annotations

import copy
import glob
import struct

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from landcover.artifacts.cntk_graph import CntkImportError, import_cntk_seed, seed_from_dictionary
from landcover.artifacts.cntk_proto import (
    CntkFormatError,
    decode_dictionary,
    read_model_dictionary,
)

# -- a tiny protobuf writer, for the wire-format tests ---------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes | int, wire: int = 2) -> bytes:
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire in (1, 5):  # fixed 64 / 32 bits
        return key + payload
    return key + varint(len(payload)) + payload


def ndarray(shape: tuple[int, ...], values: np.ndarray) -> bytes:
    dims = b"".join(varint(d) for d in shape)
    floats = field(1, np.asarray(values, "<f4").tobytes())
    return field(1, 1, 0) + field(3, field(1, dims)) + field(4, floats)


def dictionary(entries: dict[str, bytes]) -> bytes:
    return b"".join(
        field(2, field(1, key.encode()) + field(2, value)) for key, value in entries.items()
    )


def test_wire_format_values_and_tensor_order():
    values = np.arange(6, dtype=np.float32)
    message = dictionary(
        {
            "name": field(2, 6, 0) + field(8, b"W"),
            "count": field(2, 3, 0) + field(5, 300, 0),
            "ratio": field(2, 5, 0) + field(7, struct.pack("<d", 0.25), 1),
            "shape": field(2, 7, 0) + field(9, field(1, varint(3) + varint(2))),
            "list": field(2, 9, 0)
            + field(11, field(1, field(2, 1, 0) + field(3, 1, 0)) + field(1, field(8, b"x"))),
            "tensor": field(2, 11, 0) + field(13, ndarray((3, 2), values)),
        }
    )
    decoded = decode_dictionary(memoryview(message))
    assert decoded["name"] == "W" and decoded["count"] == 300 and decoded["ratio"] == 0.25
    assert decoded["shape"] == (3, 2) and decoded["list"] == [True, "x"]
    tensor = decoded["tensor"]
    assert tensor.shape == (3, 2)  # CNTK order, fastest first
    # stored column-major in CNTK's shape = row-major in the reversed (NumPy) shape
    assert np.array_equal(tensor.array, values.reshape(2, 3))


def test_damaged_files_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(dictionary({"x": field(2, 6, 0) + field(8, b"abc")})[:-2])
    with pytest.raises(CntkFormatError, match="truncated.model"):
        read_model_dictionary(truncated)
    other = tmp_path / "other.model"
    other.write_bytes(dictionary({"x": field(2, 6, 0) + field(8, b"abc")}))
    with pytest.raises(CntkFormatError, match="other.model.*not a saved CNTK function"):
        read_model_dictionary(other)
    with pytest.raises(CntkImportError, match="does not exist"):
        import_cntk_seed(tmp_path / "absent.model")


# -- the published models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cntk_dir(shared):
    path = shared / "models" / "seed-cntk"
    if not (path / "250epochs.model").is_file():
        pytest.skip(f"{path} has no CNTK models")
    return path


@pytest.fixture(scope="module")
def decoded(cntk_dir):
    return read_model_dictionary(cntk_dir / "250epochs.model")


@pytest.mark.parametrize("name", ["1epoch", "250epochs"])
def test_every_tensor_is_mapped_and_none_left_over(cntk_dir, name):
    imported = import_cntk_seed(cntk_dir / f"{name}.model")
    assert imported.cntk_tensors == 121  # 70 parameters + 51 batch-norm statistics
    assert len(imported.mapping) == len(imported.net.state_dict()) == 121
    assert len(set(imported.mapping.values())) == 121  # one CNTK tensor per PyTorch tensor
    assert imported.parameters == 314_373


def test_values_arrive_in_pytorch_layout(cntk_dir, decoded):
    imported = import_cntk_seed(cntk_dir / "250epochs.model")
    variables = {v["uid"]: v for v in decoded["inputs"]}
    state = imported.net.state_dict()
    first = variables[imported.mapping["encoder.0.0.0.weight"]]
    assert first["shape"] == (3, 3, 4, 64)  # CNTK: kW, kH, in, out
    kernel = first["value"].values.reshape(64, 4, 3, 3)  # column-major -> (out, in, kH, kW)
    assert torch.equal(state["encoder.0.0.0.weight"], torch.from_numpy(kernel))
    head_bias = variables[imported.mapping["head.bias"]]["value"].values
    assert torch.equal(state["head.bias"], torch.from_numpy(head_bias))
    variance = variables[imported.mapping["encoder.3.3.1.running_var"]]
    assert variance["name"] == "aggregate_variance" and (variance["value"].values > 0).all()


def test_unmapped_or_misshapen_tensors_are_refused(decoded):
    extra = copy.deepcopy(decoded)
    stray = dict(extra["inputs"][0], uid="Parameter999999", name="stray")
    extra["inputs"].append(stray)
    with pytest.raises(CntkImportError, match="not mapped.*Parameter999999"):
        seed_from_dictionary(extra, "extra.model")

    misshapen = copy.deepcopy(decoded)
    for variable in misshapen["inputs"]:
        if variable.get("name") == "W" and variable["shape"] == (1, 1, 32, 64):
            value = variable["value"]
            variable["value"] = type(value)((1, 1, 64, 32), value.values)
    with pytest.raises(CntkImportError, match=r"shape \(32, 64, 1, 1\).*from_up.2.weight"):
        seed_from_dictionary(misshapen, "misshapen.model")


def tutorial_scores(net: torch.nn.Module, shared, split: str, imagery: str) -> tuple[float, float]:
    """(5-label accuracy over labelled pixels, trees-vs-herbaceous accuracy) with the
    tutorial's scaling and 64 px of (mirrored) context around each 256 x 256 patch."""
    correct = total = tv_correct = tv_total = 0
    for image in sorted(glob.glob(f"{shared}/data/chesapeake-sample/{split}/*_{imagery}.tif")):
        with rasterio.open(image) as src:
            pixels = src.read().astype(np.float32) / 256
        with rasterio.open(image.replace(f"_{imagery}", "_lc")) as src:
            labels = src.read(1)
        labels = np.where((labels > 4) & (labels != 15), 4, labels)
        batch = F.pad(torch.from_numpy(pixels)[None], (64,) * 4, mode="reflect")
        with torch.inference_mode():
            logits = net(batch)[0, :, 64:-64, 64:-64].numpy()
        predicted = logits.argmax(0)
        labelled = (labels >= 1) & (labels <= 4)
        correct += (predicted[labelled] == labels[labelled]).sum()
        total += labelled.sum()
        vegetation = np.isin(labels, [2, 3])
        choice = np.where(logits[2] >= logits[3], 2, 3)
        tv_correct += (choice[vegetation] == labels[vegetation]).sum()
        tv_total += vegetation.sum()
    return correct / total, tv_correct / tv_total


ACCURACY_FLOOR = 0.85


def test_250_epoch_model_maps_real_patches(cntk_dir, shared):
    net = import_cntk_seed(cntk_dir / "250epochs.model").net
    for imagery in ("naip-old", "naip-new"):
        accuracy, trees_vs_herbaceous = tutorial_scores(net, shared, "val", imagery)
        assert accuracy >= ACCURACY_FLOOR, (imagery, accuracy)  # measured 0.906 / 0.921
        assert trees_vs_herbaceous >= ACCURACY_FLOOR, (imagery, trees_vs_herbaceous)

    # negative controls: the floor rejects the mistakes an importer can make
    swapped = copy.deepcopy(net)
    conv = swapped.encoder[0][1][0]
    conv.weight.data = conv.weight.data.transpose(0, 1).contiguous()  # in/out channels swapped
    assert max(tutorial_scores(swapped, shared, "val", "naip-old")) < ACCURACY_FLOOR - 0.2
    scrambled = copy.deepcopy(net)
    for module in scrambled.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            w = module.weight.data  # values read in CNTK's order without reversing the shape
            module.weight.data = w.flatten().reshape(w.shape[::-1]).permute(3, 2, 1, 0).clone()
    assert max(tutorial_scores(scrambled, shared, "val", "naip-old")) < ACCURACY_FLOOR - 0.2


def test_one_epoch_model_tells_trees_from_herbaceous(cntk_dir, shared):
    net = import_cntk_seed(cntk_dir / "1epoch.model").net
    _, trees_vs_herbaceous = tutorial_scores(net, shared, "train", "naip-old")
    assert trees_vs_herbaceous >= 0.65  # measured 0.732; chance is about 0.5


def test_import_command_logs_a_model_every_command_takes(cntk_dir, shared, tmp_path):
    from mlflow.tracking import MlflowClient

    from landcover.interop.import_cntk import run_import
    from landcover.registry.promote import run_promotion
    from tests.conftest import compose_config
    from tests.test_mapping_e2e import predict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = run_import(
        compose_config(
            "import_cntk",
            f"file={cntk_dir / '250epochs.model'}",
            "evaluate_split=val",
            f"data.root={shared}/data/chesapeake-sample",
            f"output_dir={tmp_path / 'evaluation'}",
            f"tracking.uri={uri}",
        )
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["val/overall_accuracy"] >= ACCURACY_FLOOR
    assert run.data.params["cntk.tensors"] == "121" and "dataset_fingerprint" in run.data.tags
    assert run.data.tags["source.sha256"]

    scene = next(iter(sorted((shared / "data/chesapeake-sample/val").glob("*_naip-old.tif"))))
    (outcome,) = predict(run_id, scene, tmp_path / "map.tif", uri, "predict.tile_size=256")
    with rasterio.open(outcome) as src:
        mapped = src.read(1)
    net = import_cntk_seed(cntk_dir / "250epochs.model").net
    with rasterio.open(scene) as src:
        pixels = torch.from_numpy(src.read().astype(np.float32) / 256)[None]
    with torch.inference_mode():
        direct = net(F.pad(pixels, (64,) * 4, mode="reflect"))[0, :, 64:-64, 64:-64].argmax(0)
    codes = np.array([0, 1, 2, 3, 4])[direct.numpy()]  # tutorial_5label: class i has code i
    # the predictor's 256 px tiles see 64 px of context, the direct pass the whole patch
    assert (mapped == codes).mean() > 0.97

    promoted = run_promotion(
        compose_config("promote", f"run={run_id}", f"tracking.uri={uri}", "registry.name=cntk")
    )
    assert promoted.champion and promoted.aliases == {"champion": "1"}


def test_import_cli_takes_the_file_as_its_argument_and_names_a_bad_one(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "landcover-import-cntk"
    bad = tmp_path / "notes.model"
    bad.write_bytes(b"\x08\x01this is not a model")
    out = subprocess.run(
        [str(script), str(bad), f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "notes.model" in out.stderr and "Traceback" not in out.stderr


def test_the_cntk_file_itself_is_a_model_reference(cntk_dir):
    from landcover import artifacts

    path = cntk_dir / "250epochs.model"
    loaded = artifacts.load(str(path), device="cpu")
    assert loaded.kind == "cntk" and loaded.output_margin == 64 and loaded.source_digest
    assert [c.name for c in loaded.schema.classes][1:] == [
        "water",
        "trees",
        "herbaceous",
        "barren_impervious",
    ]
    net = import_cntk_seed(path).net.eval()
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 4, 160, 160)).astype(np.float32)
    with torch.inference_mode():
        direct = net(torch.from_numpy(pixels / 256)).numpy()
    # the model keeps the centre its 64 px margin leaves; the bare network returns it all
    np.testing.assert_allclose(loaded.forward(pixels), direct[..., 64:-64, 64:-64], atol=1e-4)
