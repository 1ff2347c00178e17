"""LFM2-VL against transformers' `Lfm2VlForConditionalGeneration` on the same random weights.

A small random `Lfm2VlConfig` is built here, transformers' model with random weights is saved with
`save_pretrained`, and lfm2's loader reads that directory. Both models get the same
`pixel_values` / `pixel_attention_mask` / `spatial_shapes`, built here with the processor's shapes:
patches of 3*p*p values, padded to the longest image, real-patch masks, and grids whose sides are
multiples of the downsample factor. The head is untied and the blocks' output projections are
scaled up (see `shared/notes/testing-random-models.md`), so greedy tokens depend on the context.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import pytest
import torch

import lfm2
from lfm2.errors import GenerationError

transformers = pytest.importorskip("transformers")

IMAGE = 5  # image_token_id
VOCAB = 160
PATCH = 4
MAX_PATCHES = 48


def vl_config():
    text = dict(model_type="lfm2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, block_auto_adjust_ff_dim=False,
                layer_types=["conv", "full_attention", "conv", "full_attention"], max_position_embeddings=512,
                tie_word_embeddings=False)
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=PATCH, num_patches=16, vision_use_head=False)
    return transformers.Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                     projector_hidden_size=40, downsample_factor=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers') from one random checkpoint written by transformers."""
    torch.manual_seed(0)
    theirs = transformers.Lfm2VlForConditionalGeneration(vl_config()).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")) and "language_model" in name:
                p.mul_(8)  # context-dependent predictions (testing-random-models.md)
            if "vision_tower" in name and name.endswith("bias"):
                p.normal_(0, 0.1)  # transformers initialises these at (almost) zero: give them weight
    path = tmp_path_factory.mktemp("vl")
    theirs.save_pretrained(path)
    ours = lfm2.load(path).vision
    return ours, theirs


def images(shapes: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-shaped inputs for images of these patch grids: random pixels in [-1, 1], padding zero."""
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)
    pixel_values = torch.zeros(n, MAX_PATCHES, 3 * PATCH * PATCH)
    mask = torch.zeros(n, MAX_PATCHES, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        pixel_values[i, : h * w] = torch.rand(h * w, 3 * PATCH * PATCH, generator=g) * 2 - 1
        mask[i, : h * w] = 1
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(shapes))


def prompt(parts: list, seed: int = 0) -> list[int]:
    """Token ids: ints are runs of random text tokens, tuples (h, w) an image's `<image>` tokens."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for part in parts:
        if isinstance(part, tuple):
            out += [IMAGE] * ((part[0] // 2) * (part[1] // 2))
        else:
            out += torch.randint(10, VOCAB, (part,), generator=g).tolist()
    return out


@torch.no_grad()
def test_config_and_weights_load(pair):
    ours, theirs = pair
    assert ours.config.image_token_id == IMAGE and not ours.config.tie_word_embeddings
    theirs_state = theirs.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, theirs_state[name]), name


@torch.no_grad()
@pytest.mark.parametrize("shapes", [[(4, 6)], [(6, 4), (2, 8)], [(8, 6)]], ids=["one", "two", "full-grid"])
def test_logits_match_transformers(pair, shapes):
    ours, theirs = pair
    inputs = images(shapes)
    ids = torch.tensor([prompt([7, *[x for s in shapes for x in (s, 3)], 5])])
    ref = theirs(input_ids=ids, **inputs).logits
    got = ours(ids, **inputs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4
    # The images matter: other pixels give other logits.
    other = ours(ids, **images(shapes, seed=1))
    assert (other - got).abs().max() > 1e-2


@torch.no_grad()
def test_image_features_match_transformers(pair):
    ours, theirs = pair
    inputs = images([(4, 6), (6, 2)])
    ref = theirs.model.get_image_features(**inputs).pooler_output
    got = ours.image_features(**inputs)
    assert [t.shape for t in got] == [t.shape for t in ref] == [(6, 64), (3, 64)]
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_matches_transformers(pair):
    ours, theirs = pair
    shapes = [(4, 4), (2, 6), (4, 2)]  # row 0 has the first image, row 1 the other two
    inputs = images(shapes, seed=2)
    rows = [prompt([3, (4, 4), 6], seed=3), prompt([2, (2, 6), 4, (4, 2), 9], seed=4)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    ref = theirs(input_ids=ids, attention_mask=mask, **inputs).logits
    got = ours(ids, attention_mask=mask, **inputs)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4
    # Each row alone gives the same logits (batch invariance).
    alone = ours(torch.tensor([rows[0]]), **{k: v[:1] for k, v in inputs.items()})
    assert (alone[0] - got[0, T - len(rows[0]) :]).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    ours, theirs = pair
    inputs = images([(4, 6), (2, 4)], seed=5)
    ids = torch.tensor([prompt([4, (4, 6), 2, (2, 4), 3], seed=6)])
    new = 32
    ref = theirs.generate(input_ids=ids, **inputs, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    ref = ref[0, ids.shape[1] :].tolist()
    cache = ours.make_cache(1, ids.shape[1] + new)
    logits = ours(ids, cache=cache, last_only=True, **inputs)
    got = []
    for _ in range(new):
        token = int(logits[0, -1].argmax())
        got.append(token)
        logits = ours(torch.tensor([[token]]), cache=cache)
    assert got == ref
    assert len(set(ref)) >= 5  # the fixture's predictions depend on context (6 distinct of 32)


@torch.no_grad()
def test_mismatched_image_tokens_are_refused(pair):
    ours, _ = pair
    inputs = images([(4, 4)])
    ids = torch.tensor([prompt([3, (4, 4), (2, 2)])])
    with pytest.raises(GenerationError, match="image tokens"):
        ours(ids, **inputs)
    with pytest.raises(GenerationError, match="multiple of 2"):
        ours(torch.tensor([prompt([3, (4, 4)])]), **{**inputs, "spatial_shapes": torch.tensor([[3, 5]])})


def test_loader_reads_released_layout(pair, tmp_path):
    """Released checkpoints nest the tower as `vision_tower.vision_model.*`; both layouts load."""
    from safetensors.torch import load_file, save_file

    ours, theirs = pair
    theirs.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.")
               if k.startswith("model.vision_tower.") and ".vision_model." not in k else k: v
               for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    again = lfm2.load(tmp_path).vision
    for name, t in ours.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name


# -- chat with images, through the engine ---------------------------------------------------------

IMAGE_TOKENS = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"] + [
    f"<|img_row_{r}_col_{c}|>" for r in range(1, 4) for c in range(1, 4)]
SMALL_PROCESSOR = dict(encoder_patch_size=PATCH, tile_size=16, downsample_factor=2, min_image_tokens=2,
                       max_image_tokens=9, max_tiles=4)


def write_vl_chat_checkpoint(path, scale: float = 8.0, seed: int = 1, head_scale: float = 1.0):
    """A random LFM2-VL checkpoint in `path` with a real BPE tokenizer (trained here, LFM2-VL's image
    markers added as special tokens) and small processor settings; returns transformers' model of it.
    `scale` multiplies the language blocks' output projections (context-dependent predictions:
    `shared/notes/testing-random-models.md`; `tests.conftest.random_model` uses 4 for text models),
    `head_scale` the output head (at transformers' initialisation, std 0.02, its logits stay within about
    +-1 of each other, so that no adapter, which leaves the head alone, could make a reply likely)."""
    import json

    from tokenizers import AddedToken, Tokenizer

    from lfm2.train.tokenizer import train_tokenizer
    from tests.conftest import CORPUS

    train_tokenizer(CORPUS, vocab_size=600, out_dir=path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    config = vl_config()
    config.text_config.vocab_size = tok.get_vocab_size()
    config.image_token_id = tok.token_to_id("<image>")
    torch.manual_seed(seed)
    theirs = transformers.Lfm2VlForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")) and "language_model" in name:
                p.mul_(scale)
            if "vision_tower" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
        theirs.lm_head.weight.mul_(head_scale)
    theirs.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": SMALL_PROCESSOR}))
    return theirs


@pytest.fixture(scope="module")
def vl_chat(tmp_path_factory):
    """(lfm2's LLM, transformers' model) on one random LFM2-VL checkpoint (`write_vl_chat_checkpoint`)."""
    path = tmp_path_factory.mktemp("vl-chat")
    theirs = write_vl_chat_checkpoint(path)
    return lfm2.load(path), theirs


def picture(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reference_reply(llm, theirs, messages, new: int) -> str:
    """transformers' greedy reply on the prompt ids and image tensors lfm2 prepared."""
    from lfm2.images import batch

    plan = llm.chat_plan(messages)
    ids = torch.tensor([plan.ids])
    with torch.no_grad():
        out = theirs.generate(input_ids=ids, **batch(plan.images), max_new_tokens=new, do_sample=False)
    tokens = out[0, ids.shape[1] :].tolist()
    stops = llm.tokenizer.stop_ids
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
    return llm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_with_images_matches_transformers(vl_chat, tmp_path):
    llm, theirs = vl_chat
    wide = picture(64, 32, seed=1)  # tiled at these settings: 2 tiles and a thumbnail
    path = tmp_path / "small.png"
    picture(12, 12, seed=2).save(path)
    one = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(wide)}},
                                        {"type": "text", "text": "What is this?"}]}]
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                        {"type": "image", "image": wide},
                                        {"type": "image_url", "image_url": {"url": str(path)}},
                                        {"type": "text", "text": "please."}]}]
    for messages in (one, two):
        plan = llm.chat_plan(messages)
        assert plan.images and plan.ids.count(llm.vision.config.image_token_id) == sum(
            x.num_tokens for x in plan.images)
        reply = llm.chat(messages, temperature=0, repetition_penalty=1.0, max_new_tokens=12, ignore_eos=True)
        assert reply["content"] == reference_reply(llm, theirs, messages, 12)
    assert llm.chat_plan(one).images[0].rows * llm.chat_plan(one).images[0].cols == 2
    # The reply depends on the image's pixels, not only on its size.
    other = [{"role": "user", "content": [{"type": "image", "image": picture(64, 32, seed=9)},
                                          {"type": "text", "text": "What is this?"}]}]
    assert llm.chat_plan(other).ids == llm.chat_plan(one).ids
    assert (llm.chat(other, temperature=0, repetition_penalty=1.0, max_new_tokens=12, ignore_eos=True)
            != llm.chat(one, temperature=0, repetition_penalty=1.0, max_new_tokens=12, ignore_eos=True))


def test_chunked_prefill_cuts_images_anywhere(vl_chat, monkeypatch):
    import lfm2.engine
    from lfm2.prefix_cache import PrefixCache

    llm, _ = vl_chat
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache(0))  # every call prefills the whole prompt
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(64, 32, seed=3)},
                                             {"type": "text", "text": "Hi"}]}]
    whole = llm.chat(messages, temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
    monkeypatch.setattr(lfm2.engine, "PREFILL_CHUNK", 5)
    assert llm.chat(messages, temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True) == whole


def test_other_image_same_ids_is_not_served_from_the_prefix_cache(vl_chat):
    """Two images of one size give the same prompt ids; the second must not reuse the first's state."""
    from lfm2.prefix_cache import PrefixCache

    llm, theirs = vl_chat
    ask = [{"role": "user", "content": [{"type": "image", "image": picture(16, 16, seed=s)},
                                        {"type": "text", "text": "Hi"}]} for s in (4, 5)]
    assert llm.chat_plan([ask[0]]).ids == llm.chat_plan([ask[1]]).ids
    llm.prefix_cache = PrefixCache()
    first = llm.chat([ask[0]], temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
    second = llm.chat([ask[1]], temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
    assert second["content"] == reference_reply(llm, theirs, [ask[1]], 8) != first["content"]


def test_follow_up_turn_resumes_past_the_image_without_encoding_it(vl_chat, monkeypatch):
    """The second turn about an image resumes from the first turn's stored state (its image tokens
    included) and runs no vision tower; the reply equals transformers' full prefill. With the prefix
    cache emptied, the image's features still come from the feature cache."""
    from lfm2.images import FeatureCache
    from lfm2.prefix_cache import PrefixCache

    llm, theirs = vl_chat
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    monkeypatch.setattr(llm, "image_cache", FeatureCache())
    greedy = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
    first = [{"role": "user", "content": [{"type": "image", "image": picture(64, 32, seed=6)},
                                          {"type": "text", "text": "What is this?"}]}]
    reply = llm.chat(first, **greedy)
    assert llm.image_cache.stats()["misses"] == 1
    second = [*first, {"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "And?"}]
    hits, hit_tokens = llm.prefix_cache.hits, llm.prefix_cache.hit_tokens
    again = llm.chat(second, **greedy)
    assert llm.prefix_cache.hits == hits + 1
    assert llm.prefix_cache.hit_tokens - hit_tokens >= len(llm.chat_plan(first).ids)  # past the image
    assert llm.image_cache.stats()["hits"] == 0 and llm.image_cache.stats()["misses"] == 1  # not encoded again
    assert again["content"] == reference_reply(llm, theirs, second, 8)
    llm.prefix_cache.clear()
    assert llm.chat(second, **greedy) == again
    assert llm.image_cache.stats()["hits"] == 1 and llm.image_cache.stats()["misses"] == 1


def test_images_are_encoded_when_the_prompt_is_built(vl_chat, monkeypatch):
    """`chat_plan` encodes the images in the caller's thread (the server's engine thread would stall
    its other streams on the tower), except those a stored prefix already covers."""
    from lfm2.images import FeatureCache
    from lfm2.prefix_cache import PrefixCache

    llm, _ = vl_chat
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    monkeypatch.setattr(llm, "image_cache", FeatureCache(0))  # keeps nothing: every encode shows as a miss
    first = [{"role": "user", "content": [{"type": "image", "image": picture(40, 40, seed=13)},
                                          {"type": "text", "text": "Hi"}]}]
    plan = llm.chat_plan(first)
    assert llm.image_cache.misses == 1 and list(plan.embed.encoded) == [0]
    reply = llm.chat(first, temperature=0, max_new_tokens=4)
    assert llm.image_cache.misses == 2  # chat built its own plan; the engine used the plan's features
    follow = [*first, {"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "More"}]
    assert not llm.chat_plan(follow).embed.encoded and llm.image_cache.misses == 2


def test_image_rows_batch_with_text_rows(vl_chat):
    """One engine decodes a prompt with an image beside text-only prompts (continuous batching): each
    row's greedy tokens equal its own run alone."""
    from lfm2.engine import Engine, Request
    from lfm2.sampling import SamplingParams

    llm, _ = vl_chat
    image = llm.chat_plan([{"role": "user", "content": [{"type": "image", "image": picture(64, 32, seed=14)},
                                                         {"type": "text", "text": "What is this?"}]}])
    texts = [llm.chat_plan([{"role": "user", "content": words}]) for words in ("Hello there", "Tell me more")]
    params = SamplingParams(temperature=0.0)

    def requests():
        return [Request(p.ids, params, 10, embed=p.embed, ignore_eos=True) for p in (texts[0], image, texts[1])]

    alone = []
    for r in requests():
        tokens = []
        r.on_token = lambda t, out=tokens: out.append(t) and False
        for _ in Engine(llm.model).run([r]):
            pass
        alone.append(tokens)
    together = [[] for _ in range(3)]
    batch = requests()
    for r, out in zip(batch, together, strict=True):
        r.on_token = lambda t, out=out: out.append(t) and False
    engine = Engine(llm.model, max_batch=3)
    for _ in engine.run(batch):
        pass
    assert together == alone and len(set(map(tuple, alone))) == 3
    assert engine.steps < 20  # decoded as one batch (one after another would take about 30 steps)


@torch.no_grad()
def test_resumed_image_prompt_logits_equal_a_full_prefill(vl_chat):
    """Exact reuse across an image: the state stored after a prompt with an image, resumed for a longer
    prompt, gives the logits of prefilling the longer prompt whole (1e-5)."""
    from lfm2.engine import Engine, Request
    from lfm2.prefix_cache import PrefixCache
    from lfm2.sampling import SamplingParams

    llm, _ = vl_chat
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                             {"type": "image", "image": picture(40, 24, seed=7)},
                                             {"type": "text", "text": "Now describe it in detail."}]}]
    plan = llm.chat_plan(messages)
    ids, cut = plan.ids, plan.ids.index(llm.vision.config.image_token_id) + plan.images[0].num_tokens + 2
    first = llm.vision.prompt_embedder(ids[:cut], [plan.images[0].num_tokens], [plan.images[0].digest],
                                       lambda i: llm._encode_images(plan.images))
    params = SamplingParams(temperature=0.0)
    pc = PrefixCache()
    tops = []
    for prompt, embed, cache in ((ids[:cut], first, pc), (ids, plan.embed, pc), (ids, plan.embed, None)):
        request = Request(prompt, params, 1, embed=embed, logprobs=20)
        for _ in Engine(llm.model, prefix_cache=cache).run([request]):
            pass
        tops.append(request.token_logprobs[0].top)
    assert pc.hits == 1 and pc.hit_tokens == cut  # the second resumed after the image
    resumed, whole = tops[1], tops[2]
    assert [t for t, _ in resumed] == [t for t, _ in whole]
    assert max(abs(a - b) for (_, a), (_, b) in zip(resumed, whole, strict=True)) < 1e-5


def test_bad_images_in_chat_are_generation_errors(vl_chat, tiny_checkpoint):
    llm, _ = vl_chat
    good = data_url(picture(8, 8, seed=6))
    for url, message in [(good[: len(good) // 2], "truncated or corrupt|not valid base64"),
                         ("data:image/png;base64,aGVsbG8=", "not an image"),
                         ("/nonexistent/cat.png", "no such image file")]:
        with pytest.raises(GenerationError, match=message):
            llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(GenerationError, match="without an image"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(GenerationError, match="<image> markers but 2 images"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "<image> and <image>"},
                                               {"type": "image_url", "image_url": {"url": good}},
                                               {"type": "image_url", "image_url": {"url": good}}]}])
    text_only = lfm2.load(tiny_checkpoint)
    text_only.tokenizer = llm.tokenizer
    with pytest.raises(GenerationError, match="reads text only"):
        text_only.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}}]}])


def httpx_get(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=30).json()


def test_server_chat_with_an_image(vl_chat):
    """The official `openai` client sends an image part to `lfm2 serve`; bad images get 400s."""
    import openai

    from tests.test_server import MODEL, Live

    llm, _ = vl_chat
    url = data_url(picture(64, 32, seed=7))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    live = Live(llm, max_batch=2, max_queue=2)
    try:
        out = live.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                                  extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
        expected = llm.chat(messages, temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
        assert out.choices[0].message.content == expected["content"]
        assert live.post("/web/info").status_code == 405 and httpx_get(live.url + "/web/info")["capabilities"]["vision"]
        for bad, match in [(url[: len(url) // 2], "truncated or corrupt|not valid base64"),
                           ("https://example.com/cat.png", "--allow-remote-images"),
                           ("/etc/hosts", "reads no paths")]:
            parts = [{"type": "image_url", "image_url": {"url": bad}}]
            with pytest.raises(openai.BadRequestError, match=match):
                live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                                    max_tokens=4)
    finally:
        live.close()


def test_responses_api_with_an_image(vl_chat, monkeypatch):
    """`/v1/responses` reads `input_image` parts through the official client; a follow-up by
    `previous_response_id` resumes past the image (prefix cache) and encodes it no more."""
    from lfm2.images import FeatureCache
    from tests.test_server import MODEL, Live

    llm, _ = vl_chat
    monkeypatch.setattr(llm, "image_cache", FeatureCache())
    url = data_url(picture(48, 32, seed=10))
    greedy = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
    expected = llm.chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}], **greedy)
    live = Live(llm)
    try:
        extra = {"repetition_penalty": 1.0, "ignore_eos": True}
        first = live.client.responses.create(
            model=MODEL, temperature=0, max_output_tokens=8, extra_body=extra,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                {"type": "input_image", "image_url": url}]}])
        assert first.output_text == expected["content"]
        hits = llm.prefix_cache.hits
        live.client.responses.create(model=MODEL, temperature=0, max_output_tokens=4, extra_body=extra,
                                     previous_response_id=first.id, input="And the colours?")
        assert llm.prefix_cache.hits == hits + 1 and llm.image_cache.stats()["misses"] == 1
    finally:
        live.close()


def test_server_fetches_remote_images_only_when_allowed(vl_chat, tmp_path):
    """http(s) image URLs: refused by default; fetched with `remote_images` (the size limit), where an
    image over the limit, a missing one and a non-image get 400s naming the part."""
    import functools
    import http.server

    import openai

    from tests.test_server import MODEL, Live

    llm, _ = vl_chat
    picture(40, 24, seed=8).save(tmp_path / "cat.png")
    (tmp_path / "big.png").write_bytes((tmp_path / "cat.png").read_bytes() + b"\0" * 5000)
    (tmp_path / "notes.txt").write_text("not an image")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"

    def ask(live, url):
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        return live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                                   temperature=0, max_tokens=6,
                                                   extra_body={"repetition_penalty": 1.0, "ignore_eos": True})

    size = (tmp_path / "cat.png").stat().st_size
    closed = Live(llm)
    try:
        with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
            ask(closed, base + "/cat.png")
    finally:
        closed.close()
    live = Live(llm, remote_images=size + 100)
    try:
        expected = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "cat.png")},
                                                          {"type": "text", "text": "What is this?"}]}],
                            temperature=0, repetition_penalty=1.0, max_new_tokens=6, ignore_eos=True)
        assert ask(live, base + "/cat.png").choices[0].message.content == expected["content"]
        for name, match in [("big.png", "allowed"), ("missing.png", "HTTP 404"), ("notes.txt", "image")]:
            with pytest.raises(openai.BadRequestError, match=match):
                ask(live, f"{base}/{name}")
    finally:
        live.close()
        files.shutdown()


def test_cli_chat_with_images(vl_chat, tmp_path, monkeypatch, capsys):
    """`lfm2 chat --image FILE`, and `/image FILE` inside the chat, attach images to the next message."""
    import io

    from lfm2.cli import main

    llm, _ = vl_chat
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    picture(64, 32, seed=10).save(first)
    picture(12, 20, seed=11).save(second)
    (tmp_path / "broken.png").write_bytes(first.read_bytes()[:100])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\n/image " + str(tmp_path / "broken.png") +
                                                 "\n/image " + str(second) + "\nAnd this?\n/exit\n"))
    main(["chat", "--model", str(llm.path), "--image", str(first), "--temperature", "0",
          "--repetition-penalty", "1.0", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(first)}},
                                         {"type": "text", "text": "What is this?"}]}]
    reply = llm.chat(turn, temperature=0, repetition_penalty=1.0, max_new_tokens=6)
    assert reply["content"] and reply["content"] in out
    assert "truncated or corrupt" in out and "[1 image(s) attached to your next message]" in out
    with pytest.raises(SystemExit):
        main(["chat", "--model", str(llm.path), "--image", str(tmp_path / "missing.png")])
    assert "no such image file" in capsys.readouterr().err


def test_cli_generate_with_an_image_and_a_token_budget(vl_chat, tiny_checkpoint, tmp_path, capsys):
    """`lfm2 generate --image FILE PROMPT` answers through the chat template; `--max-image-tokens` and
    `--no-image-splitting` turn the dial (the reply is the library's at the same settings); text models
    and bad budgets get one clear error."""
    from lfm2.cli import main

    llm, _ = vl_chat
    path = tmp_path / "wide.png"
    picture(64, 32, seed=12).save(path)
    greedy = ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "6", "--ignore-eos"]
    main(["generate", "--model", str(llm.path), "--image", str(path), "What is this?", *greedy])
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                         {"type": "text", "text": "What is this?"}]}]
    same = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=6, ignore_eos=True)
    assert capsys.readouterr().out.strip() == llm.chat(turn, **same)["content"].strip()

    small = llm.image_processor.with_budget(max_image_tokens=4, min_image_tokens=4, splitting=False)
    plan_small = dataclasses.replace(llm, image_processor=small).chat_plan(turn)
    assert plan_small.images[0].num_tokens <= 4 and len(plan_small.images) == 1
    main(["generate", "--model", str(llm.path), "--image", str(path), "What is this?", *greedy,
          "--max-image-tokens", "4", "--min-image-tokens", "4", "--no-image-splitting"])
    assert capsys.readouterr().out.strip() == dataclasses.replace(llm, image_processor=small).chat(
        turn, **same)["content"].strip()
    for argv, words in [(["--model", str(tiny_checkpoint), "--image", str(path)], "reads text only"),
                        (["--model", str(llm.path), "--min-image-tokens", "9", "--max-image-tokens", "8"],
                         "min_image_tokens 9 is above max_image_tokens 8")]:
        with pytest.raises(SystemExit):
            main(["generate", *argv, "Hi"])
        assert words in capsys.readouterr().err


def test_released_config_builds_the_450m_shapes():
    """LFM2-VL-450M's config.json (transformers 4.55 era: `lfm2-vl`, `image_token_index`, `block_*` fields)."""
    from lfm2.models import count_parameters
    from lfm2.models.lfm2_vl import Lfm2VlForConditionalGeneration, VlConfig

    attn = [2, 5, 8, 10, 12, 14]
    raw = {"model_type": "lfm2-vl", "image_token_index": 396, "downsample_factor": 2, "projector_bias": True,
           "projector_hidden_act": "gelu", "projector_hidden_size": 2560, "max_image_tokens": 256,
           "text_config": {"model_type": "lfm2", "block_auto_adjust_ff_dim": True, "block_dim": 1024,
                           "block_ff_dim": 6656, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
                           "block_norm_eps": 1e-05, "conv_L_cache": 3, "conv_bias": False, "hidden_size": 1024,
                           "intermediate_size": 6656, "num_attention_heads": 16, "num_hidden_layers": 16,
                           "num_key_value_heads": 8, "rope_theta": 1e6, "vocab_size": 65536,
                           "layer_types": ["full_attention" if i in attn else "conv" for i in range(16)]},
           "vision_config": {"hidden_act": "gelu_pytorch_tanh", "hidden_size": 768, "intermediate_size": 3072,
                             "layer_norm_eps": 1e-06, "model_type": "siglip2_vision_model", "num_attention_heads": 12,
                             "num_channels": 3, "num_hidden_layers": 12, "num_patches": 256, "patch_size": 16,
                             "vision_use_head": False}}
    config = VlConfig.from_dict(raw)
    assert config.image_token_id == 396 and config.tie_word_embeddings and config.text.intermediate_size == 4608
    with torch.device("meta"):
        model = Lfm2VlForConditionalGeneration(config)
    assert 440e6 < count_parameters(model) < 460e6
    with pytest.raises(lfm2.errors.ConfigError, match="vision_config"):
        VlConfig.from_dict({k: v for k, v in raw.items() if k != "vision_config"})


# -- quantized, adapted and compiled vision models ------------------------------------------------


def conversations_with_images() -> list[list[dict]]:
    return [
        [{"role": "user", "content": [{"type": "image", "image": picture(64, 32, seed=1)},
                                      {"type": "text", "text": "What is this?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                      {"type": "image", "image": picture(16, 16, seed=2)},
                                      {"type": "image", "image": picture(40, 24, seed=3)}]}],
    ]


def vl_logits(llm, conversations) -> torch.Tensor:
    """The prompt logits of each conversation (its images encoded), concatenated over positions."""
    from lfm2.images import batch

    out = []
    with torch.no_grad():
        for messages in conversations:
            plan = llm.chat_plan(messages)
            out.append(llm.vision(torch.tensor([plan.ids]), **batch(plan.images))[0])
    return torch.cat(out)


def greedy_reply(llm, messages, new: int) -> str:
    """The plainest greedy loop on `llm.vision` (prefill with the images, then one token at a time): what
    `llm.chat` must give through the engine."""
    from lfm2.images import batch

    plan = llm.chat_plan(messages)
    ids = torch.tensor([plan.ids])
    cache = llm.vision.make_cache(1, ids.shape[1] + new)
    tokens = []
    with torch.no_grad():
        logits = llm.vision(ids, cache=cache, last_only=True, **batch(plan.images))
        for _ in range(new):
            tokens.append(int(logits[0, -1].argmax()))
            logits = llm.vision(torch.tensor([tokens[-1:]]), cache=cache)
    stops = llm.tokenizer.stop_ids
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
    return llm.tokenizer.decode(tokens)  # chat replies keep special tokens other than the stop tokens


GREEDY = dict(temperature=0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)
VISION_SIDE = ("model.vision_tower.", "model.multi_modal_projector.")


@pytest.fixture
def one_thread():
    """As in `test_quant`: quantized numerics on one thread stay quick on a loaded machine, where each of the
    kernels' parallel regions can wait milliseconds for a second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vl_quant(tmp_path_factory):
    """A checkpoint like `vl_chat`'s whose blocks are scaled as the text quantization tests' random models (x4)."""
    path = tmp_path_factory.mktemp("vl-quant")
    write_vl_chat_checkpoint(path, scale=4.0, seed=2)
    return path


@pytest.mark.parametrize("kind,bound,agree", [("int8", 0.03, 0.85), ("int4", 0.25, 0.5)])
def test_quantized_vl_close_to_float(vl_quant, kind, bound, agree, one_thread):
    """The language model is quantized as a text model is, within `test_quant.test_quantized_model_close_to_float`'s
    bounds; the vision tower and projector stay float, weight for weight."""
    from lfm2.models.lfm2 import is_plain_linear

    ref, llm = lfm2.load(vl_quant), lfm2.load(vl_quant, quantize=kind)
    floats = ref.vision.state_dict()
    vision = {n: t for n, t in llm.vision.state_dict().items() if n.startswith(VISION_SIDE)}
    assert len(vision) == len([n for n in floats if n.startswith(VISION_SIDE)]) > 20
    assert all(t.dtype == torch.float32 and torch.equal(t, floats[n]) for n, t in vision.items())
    assert not [n for n, m in llm.model.named_modules() if is_plain_linear(m)]
    assert llm.vision.lm_head is llm.model.lm_head and "lm_head.qweight" in llm.vision.state_dict()
    a, b = vl_logits(ref, conversations_with_images()), vl_logits(llm, conversations_with_images())
    assert a.argmax(-1).unique().numel() > 10  # the reference is not degenerate
    assert ((b - a).norm() / a.norm()).item() < bound
    assert (b.argmax(-1) == a.argmax(-1)).float().mean().item() >= agree
    messages = conversations_with_images()[0]
    assert llm.chat(messages, **GREEDY)["content"] == greedy_reply(llm, messages, 8)


def test_quantize_command_writes_a_vl_checkpoint(vl_quant, tmp_path, capsys, one_thread):
    """`lfm2 quantize` on LFM2-VL: the language model quantized, the vision side float, config.json's every
    other field kept (the loader reads image settings there too); it loads back, also in bfloat16."""
    import json

    from lfm2.cli import main
    from lfm2.errors import ConfigError
    from lfm2.weights import tensor_table

    out = tmp_path / "q8"
    main(["quantize", str(vl_quant), "-o", str(out), "--type", "int8"])
    assert "int8" in capsys.readouterr().out
    src, raw = json.loads((vl_quant / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert raw.pop("quantization") == {"type": "int8", "group_size": 32,
                                       "embedding": {"type": "int8", "group_size": 32}}
    assert raw == src
    assert (out / "processor_config.json").read_text() == (vl_quant / "processor_config.json").read_text()
    table = {name: info["dtype"] for name, (_, info) in tensor_table(out).items()}
    assert table["model.language_model.layers.0.conv.in_proj.qweight"] == "I8"
    assert table["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"] == "F32"
    assert table["model.multi_modal_projector.linear_1.weight"] == "F32"
    direct = lfm2.load(out)
    assert direct.vision.quantization == lfm2.load(vl_quant, quantize="int8").vision.quantization
    assert torch.equal(vl_logits(direct, conversations_with_images()),
                       vl_logits(lfm2.load(vl_quant, quantize="int8"), conversations_with_images()))
    half = lfm2.load(out, dtype="bfloat16")
    assert half.vision.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert half.dtype == torch.bfloat16 and half.chat(conversations_with_images()[0], **GREEDY)["content"]
    with pytest.raises(ConfigError, match="already quantized"):
        lfm2.load(out, quantize="int4")


def test_cli_chat_with_a_quantized_vl_model(vl_quant, tmp_path, monkeypatch, capsys, one_thread):
    import io

    from lfm2.cli import main

    image = tmp_path / "image.png"
    picture(64, 32, seed=10).save(image)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\n/exit\n"))
    main(["chat", "--model", str(vl_quant), "--quantize", "int8", "--image", str(image), "--temperature", "0",
          "--repetition-penalty", "1.0", "--max-new-tokens", "6"])
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": "What is this?"}]}]
    llm = lfm2.load(vl_quant, quantize="int8")
    reply = llm.chat(turn, temperature=0, repetition_penalty=1.0, max_new_tokens=6)
    assert reply["content"] and reply["content"] in capsys.readouterr().out


def _random_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_vl_adapter_adapts_the_language_model_under_peft_names(vl_chat, tmp_path, one_thread):
    """An adapter on LFM2-VL covers the language model's projections only (SigLIP2 has q/k/v/out_proj too) and is
    named as PEFT names it on transformers' model; `lfm2.load(adapter=)` applies it, and PEFT on transformers'
    model gives the same logits. Folded in before quantizing, it survives `quantize=`."""
    from safetensors.torch import load_file, save_file

    from lfm2.errors import CheckpointError
    from lfm2.images import batch
    from lfm2.lora import LoraConfig, apply_lora, save_adapter
    from lfm2.merge import merge_adapter

    llm, _ = vl_chat
    vision = lfm2.load(llm.path).vision
    wrapped = apply_lora(vision, LoraConfig(rank=4, alpha=8.0))
    assert len(wrapped) == 4 * 3 + 2 * 4 + 2 * 2 and all(n.startswith("model.language_model.layers.") for n in wrapped)
    assert not [n for n, p in vision.named_parameters() if p.requires_grad and "lora_" not in n]
    _random_lora(vision)
    adapter = save_adapter(vision, tmp_path / "adapter", base_model=str(llm.path))
    keys = load_file(adapter / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    tuned = lfm2.load(llm.path, adapter=adapter)
    convs = conversations_with_images()
    mine = vl_logits(tuned, convs)
    vision.eval()
    assert torch.equal(mine, vl_logits(dataclasses.replace(tuned, model=vision.language, vision=vision), convs))
    base = vl_logits(llm, convs)
    assert (mine - base).abs().max() > 1e-2  # the adapter matters
    assert tuned.chat(convs[0], **GREEDY)["content"] == greedy_reply(tuned, convs[0], 8)
    merged = merge_adapter(llm.path, adapter, tmp_path / "merged")  # `lfm2 merge`: a whole LFM2-VL checkpoint
    assert (merged / "processor_config.json").is_file() and lfm2.load(merged).vision is not None
    assert (vl_logits(lfm2.load(merged), convs) - mine).abs().max() <= 1e-4
    folded = vl_logits(lfm2.load(llm.path, adapter=adapter, quantize="int8"), convs)
    # int8 noise on this x8 fixture is ~0.04 (`test_quantized_vl_close_to_float` holds it to 0.03 at x4)
    assert (folded - mine).norm() / mine.norm() < min(0.08, (folded - base).norm() / base.norm() / 3)

    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base_model = transformers.Lfm2VlForConditionalGeneration.from_pretrained(llm.path)
        theirs = peft.PeftModel.from_pretrained(base_model, adapter).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # no vision layer wrapped
    with torch.no_grad():
        for messages in convs:
            plan = llm.chat_plan(messages)
            ids = torch.tensor([plan.ids])
            ref = theirs(input_ids=ids, **batch(plan.images)).logits[0]
            assert (ref - vl_logits(tuned, [messages])).abs().max() <= 1e-4

    keys["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(keys, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="vision_tower.*adapts the vision side"):
        lfm2.load(llm.path, adapter=adapter)


@pytest.mark.slow  # torch.compile: 10-30 s on 2 cores
def test_compiled_vl_chat_equals_eager(vl_chat):
    """compile=True compiles the language model's decode step; images reach prefill only, as embeddings."""
    llm, _ = vl_chat
    compiled = lfm2.load(llm.path, compile=True)
    for messages in conversations_with_images():
        assert compiled.chat(messages, **GREEDY) == llm.chat(messages, **GREEDY)
    step = compiled.model.decode_step
    assert step.failed is None and step.compile_seconds is not None
