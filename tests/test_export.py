"""Export to the Hugging Face LLaVA format: the exported model's logits equal vrlab's on the same inputs, the
processor and chat template load and render, and models LLaVA cannot express are refused with the reason."""

import pytest
import torch

from vrlab.demo.tiny_llm import build_llm, default_corpus
from vrlab.errors import VrlabError
from vrlab.export_hf import export_llava
from vrlab.mllm.model import VisionLanguageModel


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return build_llm(tmp_path_factory.mktemp("llm") / "llama", corpus=default_corpus())


def saved(tiny_root, llm, folder, encoder, adapter):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(
        encoder, str(llm), adapter, registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]}
    )
    for p in model.adapter.parameters():  # not an identity-looking init: every weight matters
        p.data.normal_(0, 0.2)
    return model.save_pretrained(folder)


@pytest.mark.parametrize(
    "encoder,adapter", [("tiny/clip", "mlp2x_gelu"), ("tiny/clip", "linear"), ("tiny/siglip", "mlp2x_gelu")]
)
def test_exported_logits_equal_vrlabs(tiny_root, llm, tmp_path, photo_files, encoder, adapter, logit_gap):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    ckpt = saved(tiny_root, llm, tmp_path / "vlm", encoder, {"type": adapter})
    out = export_llava(ckpt, tmp_path / "hf")
    ours = VisionLanguageModel.from_pretrained(ckpt)
    theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()
    diff = logit_gap(ours, theirs)
    print(f"{encoder} {adapter}: max logit difference {diff:.3g}")
    assert diff < 1e-4
    processor = LlavaProcessor.from_pretrained(out)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert text.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}]) == text
    enc = processor(images=Image.open(photo_files[0]).convert("RGB"), text=text, return_tensors="pt")
    assert int((enc.input_ids == theirs.config.image_token_index).sum()) == ours.num_vision_tokens


@pytest.mark.parametrize(
    "encoder,adapter,why",
    [
        (
            "tiny/clip",
            {"type": "qformer", "num_queries": 4, "hidden": 32, "layers": 1, "heads": 4},
            "qformer",
        ),
        ("tiny/dinov2", {"type": "mlp2x_gelu"}, "Dinov2Model is neither CLIPVisionModel"),
        ("tiny/clip.tiny/sd", {"type": "mlp2x_gelu"}, "not a single Hugging Face CLIP or SigLIP tower"),
    ],
)
def test_what_llava_cannot_express_is_refused(tiny_root, llm, tmp_path, encoder, adapter, why):
    ckpt = saved(tiny_root, llm, tmp_path / "vlm", encoder, adapter)
    with pytest.raises(VrlabError, match=f"cannot export .*{why}"):
        export_llava(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
