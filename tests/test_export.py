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


def saved(tiny_root, llm, folder, encoder, adapter, **encoder_args):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(
        encoder,
        str(llm),
        adapter,
        registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
        encoder_args=encoder_args or None,
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


def test_anyres_exports_to_llava_next_with_equal_logits(tiny_root, llm, tmp_path, photo_files):
    from conftest import decode_photo
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from vrlab.mllm.data import generation_batch

    ckpt = saved(tiny_root, llm, tmp_path / "vlm", "tiny/clip", {"type": "mlp2x_gelu"}, resolution="anyres")
    out = export_llava(ckpt, tmp_path / "hf")
    ours = VisionLanguageModel.from_pretrained(ckpt)
    theirs = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    assert torch.equal(theirs.model.image_newline, ours.adapter.image_newline)
    # a wide and a tall crop of real photos: different tile grids, unpadding on either axis
    images = [decode_photo(photo_files[0])[:, :120, :], decode_photo(photo_files[1])[:, :, :200]]
    batch = generation_batch(ours, images, ["What is in the image?", "Describe it."])
    views = batch["pixel_values"]
    assert len({lay.tiles for lay in views.layouts}) == 2
    longest = max(len(p) for p in views.pixels)
    stacked = torch.stack([torch.cat([p, p.new_zeros(longest - len(p), *p.shape[1:])]) for p in views.pixels])
    sizes = torch.tensor([lay.size for lay in views.layouts])
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=stacked,
            image_sizes=sizes,
        ).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4
    processor = LlavaNextProcessor.from_pretrained(out)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
    )
    from torchvision.transforms.functional import to_pil_image

    enc = processor(images=to_pil_image(images[0]), text=text, return_tensors="pt")
    # the processor expands <image> to the count vrlab's layout gives
    assert int((enc.input_ids == theirs.config.image_token_index).sum()) == views.layouts[0].num_vision_tokens


def test_native_resolution_is_refused(tiny_root, llm, tmp_path):
    ckpt = saved(tiny_root, llm, tmp_path / "vlm", "tiny/clip", {"type": "mlp2x_gelu"}, resolution="native")
    with pytest.raises(VrlabError, match="cannot export .*native has no LLaVA"):
        export_llava(ckpt, tmp_path / "hf")
