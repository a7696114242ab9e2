"""jafar.export: upsamplers exported to ONNX and run with onnxruntime on the CPU match PyTorch; the
caller's module is untouched; an upsampler that cannot export is refused in one sentence."""

import pytest
import torch

import jafar
from jafar.export import ExportError, check_onnx, export_onnx

pytest.importorskip("onnxruntime", reason="the ONNX checks need onnxruntime (pip install -e '.[deploy]')")


def _inputs(dim=8, grid=(4, 4), image=(32, 32)):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, *image, generator=gen), torch.randn(1, dim, *grid, generator=gen)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])  # a size that divides the image and one that does not
def test_jafar_matches_pytorch(tmp_path, size):
    torch.manual_seed(0)
    model = jafar.build_upsampler("jafar", feature_dim=8, qk_dim=16).eval()
    before = (model.attention, model.group_norm)
    path = export_onnx(model, tmp_path / "jafar.onnx", feature_grid=(4, 4), output_size=size, image_size=(32, 32))
    assert (model.attention, model.group_norm) == before  # the export works on a copy
    assert check_onnx(path, model, _inputs()) < 1e-4


def test_metadata_records_the_sizes(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the metadata is written with the onnx package")
    model = jafar.build_upsampler("jafar", feature_dim=8, qk_dim=16)
    path = export_onnx(model, tmp_path / "jafar.onnx", (4, 4), (16, 16), image_size=(32, 32))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["output_size"] == "[16, 16]" and meta["feature_grid"] == "[4, 4]" and meta["upsampler"] == "JAFAR"


@pytest.mark.parametrize("name", ["bilinear", "dysample"])
def test_peers_match_pytorch(tmp_path, name):
    torch.manual_seed(0)
    model = jafar.build_upsampler(name, feature_dim=8).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", (4, 4), (32, 32), image_size=(32, 32), feature_dim=8)
    assert check_onnx(path, model, _inputs()) < 1e-4


def test_an_upsampler_that_cannot_export_is_refused(tmp_path):
    model = jafar.build_upsampler("carafe", feature_dim=8)
    with pytest.raises(ExportError, match=r"^the CARAFE upsampler cannot be exported to ONNX: .*\.$"):
        export_onnx(model, tmp_path / "carafe.onnx", (4, 4), (32, 32), image_size=(32, 32))


def test_reencoding_upsamplers_and_bad_arguments_are_refused(tmp_path):
    from jafar.upsamplers.reencode import LargeImage

    with pytest.raises(ExportError, match="LargeImage upsampler cannot be exported to ONNX: it runs the backbone"):
        export_onnx(LargeImage.__new__(LargeImage), tmp_path / "x.onnx", (4, 4), (32, 32))
    with pytest.raises(ExportError, match="pass feature_dim"):
        export_onnx(jafar.build_upsampler("bilinear"), tmp_path / "x.onnx", (4, 4), (32, 32))
    with pytest.raises(ExportError, match="output_size must be a pair"):
        export_onnx(jafar.build_upsampler("bilinear"), tmp_path / "x.onnx", (4, 4), (32, 0), feature_dim=8)
