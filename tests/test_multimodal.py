"""Multimodal calibration (`loraplan.data` with a processor, `loraplan.calibration` with `pixel_values`): rows with an
image become tokens and pixel values, the pixel values reach the model in every pass, and they count in the data
hash. A tiny LLaVA and a real `LlavaProcessor`, both built here (no hub)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraplan import PlanConfig, make_plan
from loraplan.calibration import loss_labels, model_inputs
from loraplan.calibration.inputs import forward_runner
from loraplan.data import prepare_batches
from loraplan.errors import CalibrationError, ConfigError
from loraplan.layers import find_layers

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["[PAD]", "[UNK]", "</s>", "<image>", "a", "cat", "dog", "red", "blue", "sits", "on", "the", "mat", "big"]
IMAGE = WORDS.index("<image>")
#: 16x16 images, 4x4 patches: 16 patches (+ CLS, dropped by the default feature strategy) = 16 image tokens
SIDE, PATCH = 16, 4
IMAGE_TOKENS = (SIDE // PATCH) ** 2
TEXTS = [
    "a cat sits on the mat",
    "a dog",
    "the red cat",
    "a blue dog sits",
    "red mat",
    "the big cat",
    "a dog on the mat",
    "blue",
]
PROMPTS = ["<image> " + t for t in TEXTS]


def _config(**overrides):
    return PlanConfig(**{"selector": "cka", "calibration_samples": 8, "batch_size": 4, **overrides})


def _images(seed: int, n: int = len(TEXTS)):
    """``n`` different PIL images (of two sizes, which the image processor resizes to one)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(SIDE, SIDE), (20, 24)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(n)]


def _dataset(images, texts=PROMPTS):
    from datasets import Dataset

    return Dataset.from_dict({"image": list(images), "text": list(texts)})


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer over a small vocabulary with `<image>` as a special token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def processor(tokenizer):
    """A real `LlavaProcessor`: CLIP's image processor at 16x16, one image token per patch (CLS dropped)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def llava():
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=SIDE,
        patch_size=PATCH,
    )
    text = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=len(WORDS),
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
    )
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE)
    return tf.LlavaForConditionalGeneration(config).eval()


@pytest.fixture
def vision_calls(llava):
    """Each call of the vision tower: (images it was given, whether gradients were on)."""
    calls: list[tuple[int, bool]] = []

    def record(module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        calls.append((int(pixels.shape[0]), torch.is_grad_enabled()))

    handle = llava.model.vision_tower.register_forward_pre_hook(record, with_kwargs=True)
    yield calls
    handle.remove()


def _batches(processor, images, texts=PROMPTS, size=4, **kwargs):
    """Tokenised batches as the processor gives them for ``size`` rows at a time."""
    return [
        dict(
            processor(
                images=images[i : i + size], text=texts[i : i + size], padding=True, return_tensors="pt", **kwargs
            )
        )
        for i in range(0, len(texts), size)
    ]


def test_a_dataset_with_images_plans_the_language_model_and_its_images_change_the_scores(
    pm, llava, processor, tokenizer, vision_calls
):
    plan = make_plan(llava, _dataset(_images(0)), _config(), processor=processor, plugin_manager=pm, progress=False)
    assert plan.stack_path == "model.language_model.layers" and plan.num_layers == 4
    assert plan.calibration["num_samples"] == 8
    # every row is its 16 image tokens and its words: the <image> placeholder was expanded by the processor
    assert plan.calibration["num_tokens"] == sum(IMAGE_TOKENS + len(t.split()) for t in TEXTS)
    assert sum(n for n, _ in vision_calls) == 8 and len(vision_calls) == 2  # both batches took their 4 images
    cka = np.array(plan.scores["cka"])
    assert np.isfinite(cka).all()

    text_only = make_plan(llava, TEXTS, _config(), tokenizer=tokenizer, plugin_manager=pm, progress=False)
    assert not np.allclose(cka, text_only.scores["cka"], atol=1e-4)

    # the same texts (so the same input_ids) with other images: other scores and another data hash
    other = make_plan(llava, _dataset(_images(1)), _config(), processor=processor, plugin_manager=pm, progress=False)
    assert not np.allclose(cka, other.scores["cka"], atol=1e-4)
    assert other.calibration["data_hash"] != plan.calibration["data_hash"]
    again = prepare_batches(_dataset(_images(0)), _config(), model_config=llava.config, processor=processor)
    assert again.data_hash == plan.calibration["data_hash"]


def test_records_and_preprocessed_batches_give_the_dataset_path_scores(pm, llava, processor):
    images = _images(0)
    reference = make_plan(llava, _dataset(images), _config(), processor=processor, plugin_manager=pm, progress=False)
    records = [{"image": image, "text": text} for image, text in zip(images, PROMPTS, strict=True)]
    from_records = make_plan(llava, records, _config(), processor=processor, plugin_manager=pm, progress=False)
    assert from_records.scores["cka"] == pytest.approx(reference.scores["cka"], abs=1e-6)
    assert from_records.calibration["data_hash"] == reference.calibration["data_hash"]

    # batches of 3 rows, left-padded, re-batched into 4 right-padded rows: the same samples, scores and hash
    batches = _batches(processor, images, size=3, padding_side="left")
    assert batches[0]["attention_mask"][:, 0].tolist() != [1, 1, 1]  # really left-padded
    prepared = prepare_batches(batches, _config(), model_config=llava.config)
    first = prepared.batches[0]
    assert sorted(first) == ["attention_mask", "input_ids", "pixel_values"]
    assert tuple(first["pixel_values"].shape) == (4, 3, SIDE, SIDE)
    assert bool((first["attention_mask"][:, 0] == 1).all())  # right padding, as for text
    assert prepared.data_hash == reference.calibration["data_hash"]
    plan = make_plan(llava, batches, _config(), plugin_manager=pm, progress=False)
    assert plan.scores["cka"] == pytest.approx(reference.scores["cka"], abs=1e-5)
    assert plan.calibration["data_hash"] == reference.calibration["data_hash"]

    # a Dataset of processed rows (the raw image column beside them is left out)
    from datasets import Dataset

    rows = [
        {"input_ids": b["input_ids"][r][b["attention_mask"][r].bool()].tolist(), "pixel_values": b["pixel_values"][r]}
        for b in _batches(processor, images)
        for r in range(b["input_ids"].shape[0])
    ]
    processed = Dataset.from_list([dict(row, image=image) for row, image in zip(rows, images, strict=True)])
    prepared = prepare_batches(processed, _config(), model_config=llava.config)
    assert sorted(prepared.batches[0]) == ["attention_mask", "input_ids", "pixel_values"]
    assert prepared.data_hash == reference.calibration["data_hash"]


@pytest.mark.parametrize("selector", ["gradient", "activation"])
def test_gradient_and_activation_selectors_read_the_images(pm, llava, processor, vision_calls, selector):
    def plan(seed):
        data = _dataset(_images(seed))
        return make_plan(
            llava, data, _config(selector=selector), processor=processor, plugin_manager=pm, progress=False
        )

    scores = np.array(plan(0).scores[selector])
    assert np.isfinite(scores).all() and bool((scores > 0).all())
    assert sum(n for n, _ in vision_calls) == 8
    # the gradient pass runs the vision tower with gradients on, the forward pass without
    assert {grad for _, grad in vision_calls} == {selector == "gradient"}
    assert not np.allclose(scores, plan(1).scores[selector], rtol=1e-5)
    assert not any(p.grad is not None for p in llava.parameters())


def test_rows_without_an_image_share_a_batch_with_rows_that_have_one(pm, llava, processor):
    images = _images(0)
    images[1] = images[2] = images[6] = None
    texts = [t if image is not None else t.replace("<image> ", "") for t, image in zip(PROMPTS, images, strict=True)]
    data = _dataset(images, texts)
    prepared = prepare_batches(data, _config(), model_config=llava.config, processor=processor)
    assert [tuple(b["pixel_values"].shape)[0] for b in prepared.batches] == [2, 3]  # each batch: its rows' images
    assert prepared.num_tokens == sum(len(t.split()) for t in TEXTS) + 5 * IMAGE_TOKENS
    mixed = make_plan(llava, data, _config(), processor=processor, plugin_manager=pm, progress=False)
    alone = make_plan(llava, data, _config(batch_size=1), processor=processor, plugin_manager=pm, progress=False)
    # each image lands on its own row: the same representations as one row per batch
    assert mixed.scores["cka"] == pytest.approx(alone.scores["cka"], abs=1e-5)
    assert mixed.calibration["data_hash"] == alone.calibration["data_hash"]


def test_other_processor_outputs_travel_with_their_rows_to_the_model(llava, processor):
    batches = _batches(processor, _images(0), size=4)
    for batch in batches:
        batch["image_sizes"] = torch.tensor([[SIDE, SIDE]] * 4) + torch.arange(4).unsqueeze(1)
    prepared = prepare_batches(batches, _config(batch_size=3, calibration_samples=5), model_config=llava.config)
    assert [sorted(b) for b in prepared.batches] == [["attention_mask", "image_sizes", "input_ids", "pixel_values"]] * 2
    assert prepared.batches[1]["image_sizes"].tolist() == [[19, 19], [16, 16]]  # rows 3 and 4 kept theirs
    assert torch.equal(prepared.batches[1]["pixel_values"][1], batches[1]["pixel_values"][0])

    stack = find_layers(llava)
    batch = prepared.batches[0]
    runner = forward_runner(llava, stack, batch)
    assert runner is llava.model and stack.backbone is llava.model.language_model  # what turns images into tokens
    text_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert forward_runner(llava, stack, text_batch) is stack.backbone
    inputs = model_inputs(llava, batch, torch.device("cpu"))
    assert sorted(inputs) == ["attention_mask", "image_sizes", "input_ids", "pixel_values"]
    assert all(torch.equal(inputs[k], batch[k]) for k in batch)
    # floating inputs in the model's dtype, the others as they are
    half = model_inputs(_HalfReader(), batch, torch.device("cpu"))
    assert half["pixel_values"].dtype == torch.float16 and half["image_sizes"].dtype == torch.long
    # the loss does not ask the model to predict an image's placeholder tokens
    labels = loss_labels(llava, batch)
    assert bool((labels[batch["input_ids"] == IMAGE] == -100).all())
    assert int((labels != -100).sum()) == int(batch["attention_mask"].sum()) - 3 * IMAGE_TOKENS


class _HalfReader(torch.nn.Module):
    """A float16 module whose forward takes images."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2).half()

    def forward(self, input_ids, attention_mask, pixel_values, image_sizes):  # pragma: no cover - never run
        return pixel_values


def test_images_without_a_processor_are_refused(tokenizer):
    expected = (
        r"`processor`: the dataset's rows have images in `image` but no processor was given; pass "
        r"processor=AutoProcessor.from_pretrained\("
    )
    with pytest.raises(ConfigError, match=expected):
        prepare_batches(_dataset(_images(0)), _config(), tokenizer)
    records = [{"text": "a cat", "image": None}, {"text": "<image> a dog", "image": _images(0, 1)[0]}]
    with pytest.raises(ConfigError, match=r"`processor`: the calibration records have images in `image`"):
        prepare_batches(records, _config(), tokenizer)
    # records whose image is None everywhere are text
    assert prepare_batches([{"text": "a cat", "image": None}], _config(), tokenizer).num_tokens == 2


def test_a_processor_without_images_in_the_rows_is_refused(processor):
    from datasets import Dataset

    pictures = Dataset.from_dict({"picture": _images(0, 2), "text": PROMPTS[:2]})
    with pytest.raises(
        ConfigError, match=r"`image_field` is 'image', but the dataset has columns \['picture', 'text'\]"
    ):
        prepare_batches(pictures, _config(), processor=processor)
    assert prepare_batches(pictures, _config(image_field="picture"), processor=processor).num_samples == 2
    with pytest.raises(ConfigError, match=r"`image_field` is 'image', but the calibration data are plain texts"):
        prepare_batches(TEXTS, _config(), processor=processor)
    with pytest.raises(ConfigError, match=r"the calibration records have keys \['text'\].*leave out processor="):
        prepare_batches([{"text": t} for t in TEXTS], _config(), processor=processor)


def test_an_image_without_its_placeholder_is_refused(processor):
    data = _dataset(_images(0, 2), ["<image> a cat", "a dog"])
    with pytest.raises(
        CalibrationError, match=r"calibration row 1 has 1 image\(s\) in `image` but 0 '<image>' placeholder\(s\)"
    ):
        prepare_batches(data, _config(), processor=processor)


def test_max_length_may_cut_text_after_an_image_but_not_the_image(processor):
    data = _dataset(_images(0, 1), ["<image> a cat sits"])
    cut = prepare_batches(data, _config(max_length=IMAGE_TOKENS + 1), processor=processor)
    assert cut.num_tokens == IMAGE_TOKENS + 1 and cut.batches[0]["pixel_values"].shape[0] == 1
    late = _dataset(_images(0, 1), ["a cat <image>"])
    with pytest.raises(CalibrationError, match=r"`max_length`: calibration row 0 has an image and is 18 tokens long"):
        prepare_batches(late, _config(max_length=10), processor=processor)


def test_batches_that_cannot_be_split_or_mixed_are_refused(llava, processor):
    (batch,) = _batches(processor, _images(0, 2), PROMPTS[:2])
    three = dict(batch, pixel_values=torch.cat([batch["pixel_values"], batch["pixel_values"][:1]]))
    with pytest.raises(CalibrationError, match=r"calibration batch 0: `pixel_values` has shape \(3, 3, 16, 16\) for 2"):
        prepare_batches([three], _config(), model_config=llava.config)
    # no image token known (no processor, no model config): a batch mixing rows with and without images is refused
    rows = [
        {"input_ids": batch["input_ids"][:1], "pixel_values": batch["pixel_values"][:1]},
        {"input_ids": torch.tensor([[4, 5]])},
    ]
    with pytest.raises(
        CalibrationError,
        match=r"`batch_size`: calibration batch 0 mixes rows with `pixel_values` \(rows \[0\]\) and rows without "
        r"\(rows \[1\]\).*Set batch_size=1",
    ):
        prepare_batches(rows, _config(batch_size=2))
    assert len(prepare_batches(rows, _config(batch_size=1))) == 2
    with pytest.raises(CalibrationError, match=r"calibration batch 0: `note` is list .*not a tensor"):
        prepare_batches([dict(batch, note=["x", "y"])], _config(), model_config=llava.config)


def test_a_text_model_given_pixel_values_says_it_cannot_read_them(pm, make_llama, llava, processor):
    batches = _batches(processor, _images(0), size=4)
    with pytest.raises(
        CalibrationError, match=r"carry \['pixel_values'\], but LlamaForCausalLM.forward does not take it"
    ):
        make_plan(make_llama(layers=2, vocab=len(WORDS)), batches, _config(), plugin_manager=pm, progress=False)
