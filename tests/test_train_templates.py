"""Labels under chat templates, token by token: llava-hf 1.5 (vicuna style, `{% generation %}`
markers), a ChatML one (LLaVA-NeXT's Qwen-based checkpoints) and a Llama-3 one, plus vicuna_v1
against LLaVA's own preprocess_v1 (whole string, masked by lengths)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from cogalign.train.collate import IGNORE, Encoder  # noqa: E402

# llava-hf/llava-1.5-7b-hf chat_template.json
LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# llava-hf/llava-interleave-qwen (LLaVA-NeXT, Qwen ChatML)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# llava-hf/llama3-llava-next-8b-hf
LLAMA3 = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

TURNS = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A"},
         {"from": "human", "value": "VQ please"}, {"from": "gpt", "value": "<vq start>5, 17<vq end>"},
         {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "A red cat. ASSISTANT: no"}]
CORPUS = ["USER: What is it? ASSISTANT: A cat.", "ASSISTANT: A red cat. VQ please", "<vq start>5, 17<vq end>",
          "And the colour? user assistant\n\nWhat is it?\n", "A chat between a curious user and an artificial "
          "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."]


def llama_tokenizer():
    """A Llama-2 style tokenizer (sentencepiece BPE: `▁` for spaces, byte fallback, BOS added)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in spec["merges"]], legacy=True,
                         add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def byte_tokenizer(bos: str | None, eos: str, specials: list[str]):
    """A byte-level BPE (as Qwen2 / Llama-3) with the template's special tokens."""
    from cogalign.train.model import train_tokenizer

    tok = train_tokenizer(iter(CORPUS * 20), vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": specials + [t for t in (bos, eos) if t and t not in specials]})
    tok.bos_token, tok.eos_token = bos, eos
    return tok


def processor_for(tok, template):
    from transformers import LlavaProcessor

    from cogalign.train.model import TINY_PATCH, tiny_processor

    ip = tiny_processor(byte_tokenizer(None, "</s>", [])).image_processor
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=TINY_PATCH, chat_template=template,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def reference(enc, full: str, answers: list[tuple[str, str]], bos: bool) -> tuple[list, list]:
    """ids and labels by lengths, from the expected strings: each (prompt, prompt + answer + end of turn)."""
    tok, n = enc.tok, enc.num_image_tokens

    def tokens(text):
        out = [tok.bos_token_id] if bos else []
        for i, piece in enumerate(text.split("<image>")):
            out += ([enc.image_id] * n if i else []) + tok(piece, add_special_tokens=False)["input_ids"]
        return out

    ids = tokens(full)
    labels = [IGNORE] * len(ids)
    for prompt, upto in answers:
        a, b = len(tokens(prompt)), len(tokens(upto))
        assert tokens(upto)[:b] == ids[:b]
        labels[a:b] = ids[a:b]
    return ids, labels


def image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


def check(enc, full, answers, bos):
    ids, labels = reference(enc, full, answers, bos)
    row = enc.encode_record(TURNS, [image()])
    assert row["input_ids"] == ids
    assert row["labels"] == labels  # token by token
    # the generation prompt of each answer is the training prefix, token for token
    supervised = [i for i, l in enumerate(labels) if l != IGNORE]
    starts = [i for i in supervised if labels[i - 1] == IGNORE]
    for k, start in zip((1, 3, 5), starts):
        assert enc.prompt_ids(TURNS, k, [image()]) == ids[:start]
    return row


def test_llava_hf_15_template_supervises_answers_and_eos():
    tok = llama_tokenizer()
    enc = Encoder(processor_for(tok, LLAVA_15), 4096)
    head = "USER: <image>\nWhat is it? ASSISTANT:"
    p2 = head + " A</s> USER: VQ please ASSISTANT:"
    p3 = p2 + " <vq start>5, 17<vq end></s> USER: And the colour? ASSISTANT:"
    full = p3 + " A red cat. ASSISTANT: no</s> "
    row = check(enc, full, [(head, head + " A</s>"), (p2, p2 + " <vq start>5, 17<vq end></s>"),
                            (p3, p3 + " A red cat. ASSISTANT: no</s>")], bos=True)
    assert row["input_ids"][0] == tok.bos_token_id  # BOS as the tokenizer adds it
    first = next(i for i, l in enumerate(row["labels"]) if l != IGNORE)
    assert tok.decode(row["input_ids"][first:first + 2]) .strip() == "A</s>"  # not the `A` of ASSISTANT
    # the first prompt is what the template's add_generation_prompt renders
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tok.apply_chat_template(msgs, chat_template=LLAVA_15, tokenize=False, add_generation_prompt=True) == head


def test_chatml_template_supervises_im_end():
    tok = byte_tokenizer(None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<image>"])
    enc = Encoder(processor_for(tok, CHATML), 4096)
    p1 = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    p2 = p1 + "A<|im_end|>\n<|im_start|>user\nVQ please<|im_end|>\n<|im_start|>assistant\n"
    p3 = p2 + "<vq start>5, 17<vq end><|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n<|im_start|>assistant\n"
    full = p3 + "A red cat. ASSISTANT: no<|im_end|>\n"
    row = check(enc, full, [(p1, p1 + "A<|im_end|>"), (p2, p2 + "<vq start>5, 17<vq end><|im_end|>"),
                            (p3, p3 + "A red cat. ASSISTANT: no<|im_end|>")], bos=False)
    assert row["kinds"].count(2) == len(tok("<vq start>5, 17<vq end><|im_end|>", add_special_tokens=False)["input_ids"])


def test_llama3_template_supervises_eot_and_keeps_one_bos():
    tok = byte_tokenizer("<|begin_of_text|>", "<|eot_id|>",
                         ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"])
    enc = Encoder(processor_for(tok, LLAMA3), 4096)
    user, bot = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"
    p1 = "<|begin_of_text|>" + user + "<image>\nWhat is it?<|eot_id|>" + bot
    p2 = p1 + "A<|eot_id|>" + user + "VQ please<|eot_id|>" + bot
    p3 = p2 + "<vq start>5, 17<vq end><|eot_id|>" + user + "And the colour?<|eot_id|>" + bot
    full = p3 + "A red cat. ASSISTANT: no<|eot_id|>"
    row = check(enc, full, [(p1, p1 + "A<|eot_id|>"), (p2, p2 + "<vq start>5, 17<vq end><|eot_id|>"),
                            (p3, p3 + "A red cat. ASSISTANT: no<|eot_id|>")], bos=False)
    assert row["input_ids"].count(tok.bos_token_id) == 1


def llava_preprocess_v1(turns, tok, image_id, n_image):
    """LLaVA's train.py preprocess_multimodal + preprocess_v1 (conv_vicuna_v1), reimplemented:
    the whole prompt tokenized by tokenizer_image_token, targets masked by round lengths."""
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    prompt = system + " "
    for t in turns:
        value = t["value"]
        if t["from"] == "human":
            if "<image>" in value:
                value = "<image>\n" + value.replace("<image>", "").strip()
            prompt += "USER: " + value + " "
        else:
            prompt += "ASSISTANT: " + value + "</s>"

    def tokenizer_image_token(text):
        chunks = [tok(c).input_ids for c in text.split("<image>")]
        out, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
            offset = 1
            out.append(chunks[0][0])
        for k, chunk in enumerate(chunks):
            if k:
                out.append(-200)
            out.extend(chunk[offset:])
        return out

    ids = tokenizer_image_token(prompt)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE] * cur
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou))
        instruction_len = len(tokenizer_image_token(parts[0])) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    # LLaVA puts one -200 where the model splices the image; the HF model takes one id per feature
    at = ids.index(-200)
    return (ids[:at] + [image_id] * n_image + ids[at + 1:],
            target[:at] + [IGNORE] * n_image + target[at + 1:])


def test_vicuna_v1_matches_llava_preprocess_v1():
    tok = llama_tokenizer()
    enc = Encoder(processor_for(tok, None), 4096)
    assert not enc.template
    turns = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "VQ please"}, {"from": "gpt", "value": "<vq start>5, 17<vq end>"}]
    ids, labels = llava_preprocess_v1(turns, tok, enc.image_id, enc.num_image_tokens)
    row = enc.encode_record(turns, [image()])
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]).replace(" ", "") == "Acat.</s><vqstart>5,17<vqend></s>"
    # the generation prompt (`...ASSISTANT:`) is the training prefix
    start = next(i for i, l in enumerate(labels) if l != IGNORE)
    assert enc.prompt_ids(turns, 1, [image()]) == ids[:start]


def test_the_earlier_interface_gets_the_same_labels():
    """`segments()` + `encode()` (what generate used) give the same labels under llava-hf 1.5:
    the answer `A` and its `</s>`, not the `A` of `ASSISTANT`."""
    tok = llama_tokenizer()
    enc = Encoder(processor_for(tok, LLAVA_15), 4096)
    row = enc.encode(enc.segments(TURNS, True))
    supervised = [i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]
    assert tok.decode(supervised).split() == ["A</s>", "<vq", "start>5,", "17<vq", "end></s>", "A", "red",
                                              "cat.", "ASSISTANT:", "no</s>"]
    assert row["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("template", [None, CHATML])
def test_a_records_system_prompt_is_what_the_model_sees(template):
    """Chat data's system turns are kept in the record's `system` key (and exported as the system
    message); training and generation used to drop it and show vicuna's default system instead."""
    from cogalign.train.collate import Collator
    from cogalign.train.generate import fit_prompt

    tok = llama_tokenizer() if template is None else byte_tokenizer(None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<image>"])
    enc = Encoder(processor_for(tok, template), 4096)
    record = {"id": "s", "system": "Answer in one word.", "conversations": TURNS[:4]}
    batch = Collator(enc)([{"record": record, "images": [image()], "position": 0}])
    text = tok.decode(batch["input_ids"][0].tolist())
    expected = "Answer in one word. USER:" if template is None else "<|im_start|>system\nAnswer in one word.<|im_end|>"
    assert expected in text.replace("  ", " ") and "A chat between" not in text
    labels = batch["labels"][0].tolist()
    start = next(i for i, l in enumerate(labels) if l != IGNORE)
    ids, dropped, problem = fit_prompt(enc, TURNS[:4], 1, [image()], 4096, record["system"])
    assert ids == batch["input_ids"][0].tolist()[:start] and not dropped and problem is None
