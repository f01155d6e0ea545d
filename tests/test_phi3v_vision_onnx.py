"""Phi-3-Vision vision graph: ONNX export of export.phi3v_wrappers + the runtime's numpy layout, against
the PyTorch model's official-order path (layout of the 4C-wide merged features, then projection,
every crop including the zero padding run), at two aspect ratios and num_crops 4 and 16."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from octopus_rt.runtime.hd_transform import HDTransform  # noqa: E402
from octopus_rt.runtime.phi3v_layout import assemble_image_tokens, image_token_order  # noqa: E402


@pytest.fixture(scope="module")
def vision_session(tiny_phi3v_model, tmp_path_factory):
    from octopus_rt.export.phi3v_wrappers import VISION_INPUT_NAMES, VISION_OUTPUT_NAMES, Phi3VVisionWrapper

    path = tmp_path_factory.mktemp("phi3v_onnx") / "vision.onnx"
    crops = torch.export.Dim("crops", min=1, max=64)
    with torch.no_grad():
        # Traced with 3 crops so no size-1 specialisation is baked in; run below with 2 to 13 crops.
        program = torch.onnx.export(
            Phi3VVisionWrapper(tiny_phi3v_model).eval(), (torch.randn(3, 3, 336, 336),), None,
            input_names=VISION_INPUT_NAMES, output_names=VISION_OUTPUT_NAMES,
            dynamic_shapes={"pixel_values": {0: crops}}, opset_version=18, dynamo=True, verbose=False,
        )
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("num_crops", [4, 16])
def test_onnx_vision_plus_numpy_layout_matches_torch(num_crops, vision_session, tiny_phi3v_model):
    from octopus_rt.export.phi3v_wrappers import projected_separators

    separators = projected_separators(tiny_phi3v_model).numpy()
    rng = np.random.default_rng(num_crops)
    for width, height in ((640, 320), (300, 900)):  # landscape 2:1 and portrait 1:3
        hd = HDTransform(num_crops=num_crops)(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        (crop_features,) = vision_session.run(None, {"pixel_values": hd.pixel_values[: hd.num_used_crops]})
        tokens = assemble_image_tokens(crop_features, separators, hd.crop_grid)
        with torch.no_grad():
            reference = tiny_phi3v_model.vision_embed_tokens(torch.from_numpy(hd.pixel_values)[None], [hd.image_size])[0]
        assert tokens.shape == tuple(reference.shape) == (hd.num_img_tokens, tiny_phi3v_model.config.hidden_size)
        # fp32 graph vs eager torch: measured max gap 8e-7 on values of magnitude ~1.
        np.testing.assert_allclose(tokens, reference.numpy(), rtol=0, atol=1e-5)


def test_token_order_small_grid_by_hand():
    # m = 2, one row of two crops: table rows 0-3 global, 4-7 crop (0,0), 8-11 crop (0,1), 12 sub, 13 glb.
    order = image_token_order((1, 2), tokens_per_side=2).tolist()
    assert order == [4, 5, 8, 9, 12, 6, 7, 10, 11, 12, 13, 0, 1, 12, 2, 3, 12]
    assert len(order) == (1 * 2 + 1) * 4 + 1 + (1 + 1) * 2
