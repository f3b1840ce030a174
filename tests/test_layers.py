"""Layer-resolved stores: one pass records several hidden layers, and each layer's view equals a
single-layer extraction of that layer bit for bit, key and settings included."""

import pytest
import torch

from vrlab.errors import VrlabError
from vrlab.extract import ExtractionRequest, run_extraction


def request(tiny_root, data_root, tmp_path, **kw):
    return ExtractionRequest(
        encoder=kw.pop("encoder", "tiny/clip"),
        benchmark="synth-folder-train",
        registry={"encoder_dirs": [str(tiny_root / "cards")]},
        data_root=str(data_root),
        outputs=str(tmp_path),
        num_workers=0,
        batch_size=3,
        shard_size=4,
        limit=10,
        **kw,
    )


@pytest.mark.parametrize("encoder", ["tiny/clip", "tiny/dinov2-reg"])
def test_a_layer_view_equals_a_single_layer_extraction(tiny_root, data_root, tmp_path, encoder):
    multi = run_extraction(request(tiny_root, data_root, tmp_path, encoder=encoder, layers=[-1, 1, 0]))
    assert multi.layers == [-1, 0, 1]
    for layer in (-1, 0, 1):
        single = run_extraction(
            request(tiny_root, data_root, tmp_path, encoder=encoder, encoder_args={"layer": layer})
        )
        view = multi.view(layer)
        assert view.manifest["key"] == single.manifest["key"]
        assert view.settings == single.settings
        assert view.ids == single.ids
        assert torch.equal(view.load(), single.load())  # bit for bit
        assert all(torch.equal(view.tokens(i), single.tokens(i)) for i in range(len(single)))
    # the store's own tokens are the card's layer (-2), and differ from every view
    default = run_extraction(request(tiny_root, data_root, tmp_path, encoder=encoder))
    assert torch.equal(multi.load(), default.load()) and multi.manifest["key"] != default.manifest["key"]
    assert not torch.equal(multi.view(1).load(), multi.view(-1).load())
    with pytest.raises(VrlabError, match="not 5"):
        multi.view(5)
    with pytest.raises(VrlabError, match="already the view of layer 1"):
        multi.view(1).view(0)


def test_all_layers_and_bad_requests(tiny_root, data_root, tmp_path):
    every = run_extraction(request(tiny_root, data_root, tmp_path, layers="all"))
    assert every.layers == [0, 1, 2, 3]  # the embeddings and each of the 3 blocks
    with pytest.raises(VrlabError, match="out of range"):
        run_extraction(request(tiny_root, data_root, tmp_path, layers=[7]))
    with pytest.raises(VrlabError, match="must be a list of layer indices"):
        request(tiny_root, data_root, tmp_path, layers="last")
    with pytest.raises(
        VrlabError, match="fixed-grid tower's layers, not 'tiny/clip' under resolution=anyres"
    ):
        run_extraction(
            request(tiny_root, data_root, tmp_path, layers=[-1], encoder_args={"resolution": "anyres"})
        )
    with pytest.raises(VrlabError, match="transformers backend"):
        run_extraction(request(tiny_root, data_root, tmp_path, encoder="tiny/eva02-timm", layers=[-1]))
