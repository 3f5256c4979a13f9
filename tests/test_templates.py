import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from cogalign.cli.templates import templates_app
from cogalign.errors import CogalignError
from cogalign.targets.regions import REGION_NAMES, Region, region_box
from cogalign.targets.templates import KINDS, Prompt, TemplateSampler, load_templates, shipped_templates_dir

SAMPLER = TemplateSampler()
UPPER_LEFT = Region("upper-left", (0, 0, 336, 336))
TABLE6_VQ = ("Imagine a hypothetical encoding process for the upper left quarter of this image. What would the "
             "resulting VQ indices look like, summarizing its content? Note that the image resolution is "
             "[3, 672, 672], so you should generate 1764 indices")
TABLE6_PX = ("Please tell me the RGB value of each and every pixel that makes up the upper left quarter of this "
             "image. Note that the image resolution is [3, 672, 672].")
GOOD = {"vq": ["Give the VQ indices of this image."], "px": ["List the pixels of this image."]}


def test_shipped_tables():
    templates = load_templates()
    assert shipped_templates_dir().joinpath("vq.txt").is_file()
    assert [len(templates[k]) for k in KINDS] == [20, 20]
    for kind in KINDS:
        assert len(set(templates[kind])) == 20
        for text in templates[kind]:
            assert text.count("this image") == 1
            assert text == " ".join(text.split())
            assert "- " not in text and "im- age" not in text
    assert templates["vq"][0] == ("Provide the VQ indices that would represent the essential features of this "
                                  "image, capturing its key visual elements.")
    assert templates["vq"][3].endswith("this image’s visual information.")
    assert "hierarchical organization of visual information in this image" in templates["vq"][15]
    assert "(VQ indices) of this image" in templates["vq"][17]
    assert templates["px"][3] == "Please give me a detailed breakdown of the RGB values for each pixel in this image."
    assert templates["px"][7] == "I’m looking for the RGB value of each pixel in this image, could you assist?"
    assert templates["px"][19] == ("I’m looking to obtain the RGB values for all pixels in this image, "
                                   "can you assist me?")


def test_table6_prompts_exactly():
    vq_id = next(i for i, t in enumerate(SAMPLER.templates("vq")) if t.startswith("Imagine a hypothetical"))
    px_id = SAMPLER.templates("px").index("Please tell me the RGB value of each and every pixel that makes up this image.")
    assert SAMPLER.fill("vq", vq_id, UPPER_LEFT, (672, 672), 1764) == TABLE6_VQ
    assert SAMPLER.fill("px", px_id, UPPER_LEFT, (672, 672)) == TABLE6_PX
    assert SAMPLER.fill("px", px_id, "the upper left quarter of this image", (672, 672)) == TABLE6_PX


def test_hints():
    assert SAMPLER.hint("px", (448, 672)) == "Note that the image resolution is [3, 448, 672]."
    assert SAMPLER.hint("vq", (672, 672), 1764) == ("Note that the image resolution is [3, 672, 672], "
                                                    "so you should generate 1764 indices")
    with pytest.raises(ValueError, match="length"):
        SAMPLER.hint("vq", (672, 672))
    with pytest.raises(ValueError, match="kind"):
        SAMPLER.hint("rgb", (672, 672))
    with pytest.raises(ValueError, match="out of range"):
        SAMPLER.fill("px", 20, UPPER_LEFT, (672, 672))
    with pytest.raises(ValueError, match="out of range"):
        SAMPLER.fill("px", -1, UPPER_LEFT, (672, 672))


def test_prompt_determinism_and_uniformity():
    a = SAMPLER.prompt("vq", 42, UPPER_LEFT, (672, 672), 1764)
    assert a == SAMPLER.prompt("vq", np.random.default_rng(42), UPPER_LEFT, (672, 672), 1764)
    assert isinstance(a, Prompt) and a.kind == "vq"
    assert a.text == SAMPLER.fill("vq", a.template_id, UPPER_LEFT, (672, 672), 1764)
    ids = [SAMPLER.sample_id("px", np.random.default_rng(s)) for s in range(2000)]
    counts = np.bincount(ids, minlength=20)
    assert counts.min() > 60 and counts.max() < 140


def test_content_hash():
    assert SAMPLER.content_hash == TemplateSampler().content_hash
    assert len(SAMPLER.content_hash) == 16 and int(SAMPLER.content_hash, 16) >= 0
    assert TemplateSampler(GOOD).content_hash != SAMPLER.content_hash
    assert TemplateSampler({"vq": GOOD["vq"]}).templates("px") == SAMPLER.templates("px")


def region_strategy():
    def build(name, x0, x1, y0, y1):
        if name == "box":
            return Region("box", (min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1))
        return Region(name, region_box(name, 672, 672, 8))
    coord = st.integers(0, 671)
    return st.builds(build, st.sampled_from(REGION_NAMES), coord, coord, coord, coord)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KINDS), template_id=st.integers(0, 19), region=region_strategy(),
       length=st.integers(1, 10_000))
def test_fill_keeps_region_phrase_once(kind, template_id, region, length):
    text = SAMPLER.fill(kind, template_id, region, (672, 672), length)
    assert text.count(region.phrase()) == 1
    assert text.count("this image") == 1
    template = SAMPLER.templates(kind)[template_id]
    before, after = template.split("this image")
    assert text.startswith(before + region.phrase() + after + " Note that the image resolution is [3, 672, 672]")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_directory(tmp_path):
    write(tmp_path / "vq.txt", "Encode this image.\n\nTokens of this image please.\n")
    write(tmp_path / "px.txt", "Pixels of this image.\n")
    templates = load_templates(tmp_path)
    assert templates == {"vq": ["Encode this image.", "Tokens of this image please."], "px": ["Pixels of this image."]}
    (tmp_path / "px.txt").unlink()
    assert load_templates(tmp_path)["px"] == SAMPLER.templates("px")


def test_load_json_and_yaml(tmp_path):
    assert load_templates(write(tmp_path / "t.json", json.dumps(GOOD))) == GOOD
    yaml_text = "vq:\n  - Give the VQ indices of this image.\npx:\n  - List the pixels of this image.\n"
    assert load_templates(write(tmp_path / "t.yaml", yaml_text)) == GOOD
    assert load_templates(write(tmp_path / "t.yml", yaml_text)) == GOOD
    only_px = load_templates(write(tmp_path / "px.json", json.dumps({"px": GOOD["px"]})))
    assert only_px == {"vq": SAMPLER.templates("vq"), "px": GOOD["px"]}
    sampler = TemplateSampler.from_path(tmp_path / "t.json")
    assert sampler.templates("vq") == GOOD["vq"]


@pytest.mark.parametrize("templates, message", [
    ({"vq": ["Encode the picture."]}, "vq template 0 contains 'this image' 0 times"),
    ({"vq": ["Encode this image.", "this image and this image"]}, "vq template 1 contains 'this image' 2 times"),
    ({"px": ["<image> pixels of this image"]}, "px template 0 contains '<image>'"),
    ({"px": ["pixels of this image</s>"]}, "px template 0 contains '</s>'"),
    ({"vq": ["ASSISTANT: this image"]}, "vq template 0 contains 'ASSISTANT:'"),
    ({"vq": [""]}, "vq template 0 is empty"),
    ({"vq": [3]}, "vq template 0 is empty or not a string"),
    ({"vq": []}, "vq templates must be a non-empty list"),
    ({"vq": "Encode this image."}, "vq templates must be a non-empty list"),
    ({"rgb": ["this image"]}, "unknown template kind 'rgb'"),
])
def test_validation_errors(tmp_path, templates, message):
    path = write(tmp_path / "bad.json", json.dumps(templates))
    with pytest.raises(CogalignError) as err:
        load_templates(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text
    with pytest.raises(CogalignError, match="<templates>"):
        TemplateSampler(templates)


def test_validation_error_in_directory_names_file(tmp_path):
    write(tmp_path / "px.txt", "Pixels of this image.\nPixels please.\n")
    with pytest.raises(CogalignError) as err:
        load_templates(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'px.txt'}: px template 1 contains 'this image' 0 times; "
                                     "it must appear exactly once")


@pytest.mark.parametrize("name, content, message", [
    ("t.json", "{not json", "not valid JSON"),
    ("t.yaml", "vq: [unclosed", "not valid YAML"),
    ("t.yaml", "- just\n- a list\n", "expected a mapping"),
    ("t.txt", "Encode this image.", "unsupported templates file"),
])
def test_file_errors(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(CogalignError, match=message):
        load_templates(path)


@pytest.mark.parametrize("name, content", [
    ("vq.txt", "Encode this image.\nAgain this image.\n"),
    ("t.json", '{"vq": ["Encode this image.", "Again this image."]}'),
    ("t.yaml", "vq:\n  - Encode this image.\n  - Again this image.\n"),
    ("t.yml", "vq: [Encode this image., Again this image.]\n"),
])
def test_a_byte_order_mark_never_reaches_a_prompt(tmp_path, name, content):
    """Windows editors save UTF-8 with a BOM; it is not part of the first template."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    loaded = load_templates(tmp_path if name.endswith(".txt") else path)
    assert loaded["vq"] == ["Encode this image.", "Again this image."]
    prompt = TemplateSampler(loaded).fill("vq", 0, "this image", (16, 16), 4)
    assert prompt.startswith("Encode") and "\ufeff" not in prompt


def test_missing_sources(tmp_path):
    with pytest.raises(CogalignError, match="not found"):
        load_templates(tmp_path / "nope.json")
    with pytest.raises(CogalignError, match="no vq.txt or px.txt"):
        load_templates(tmp_path)


RUNNER = CliRunner()


def invoke(*args):
    return RUNNER.invoke(templates_app, list(args), env={"COLUMNS": "200"})


def test_cli_list_and_show():
    result = invoke("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 40 and lines[0].startswith("vq\t0\tProvide the VQ") and lines[20].startswith("px\t0\t")
    result = invoke("list", "--kind", "px")
    assert len(result.output.splitlines()) == 20
    assert invoke("show", "2").output.strip() == SAMPLER.templates("vq")[2]
    assert invoke("show", "18", "--kind", "px").output.strip() == SAMPLER.templates("px")[18]
    result = invoke("show", "20")
    assert result.exit_code == 2 and "out of range" in result.output
    # `list` prints "px<TAB>18<TAB>...": the same two words work for `show` (they were "not a valid integer")
    assert invoke("show", "px", "18").output.strip() == SAMPLER.templates("px")[18]
    result = invoke("show", "rgb", "3")
    assert result.exit_code == 2 and "the kind is vq or px" in result.output
    result = invoke("show", "vq", "x")
    assert result.exit_code == 2 and "'x' is not a template id" in result.output


def test_cli_sample():
    result = invoke("sample", "--seed", "0", "--count", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3 and lines == invoke("sample", "--seed", "0", "--count", "3").output.splitlines()
    for line in lines:
        assert line.endswith("Note that the image resolution is [3, 672, 672], so you should generate 1764 indices")
        assert "upper left quarter of this image" in line
    result = invoke("sample", "--kind", "px", "--region", "halves", "--resolution", "32x48", "--count", "5")
    assert result.exit_code == 0
    assert all(line.endswith("Note that the image resolution is [3, 32, 48].") for line in result.output.splitlines())
    result = invoke("sample", "--region", "center", "--resolution", "64", "--factor", "16", "--count", "1")
    assert result.output.strip().endswith("so you should generate 4 indices")
    result = invoke("sample", "--length", "99", "--count", "1")
    assert result.output.strip().endswith("so you should generate 99 indices")


def test_cli_sample_with_user_templates(tmp_path):
    path = write(tmp_path / "t.json", json.dumps(GOOD))
    result = invoke("sample", "--templates", str(path), "--count", "1")
    assert result.output.strip().endswith("Give the VQ indices of the upper left quarter of this image. "
                                          "Note that the image resolution is [3, 672, 672], so you should generate 1764 indices")


@pytest.mark.parametrize("args, message", [
    (("sample", "--region", "middle"), "unknown region 'middle'"),
    (("sample", "--resolution", "100"), "not a multiple of the grid of 8 px"),
    (("sample", "--length", "lots"), "--length"),
    (("sample", "--resolution", "8"), "--region upper-left cannot be cut at --resolution 8x8"),
    (("sample", "--resolution", "8x64"), "use --resolution 16x64 or larger"),
    (("sample", "--region", "center", "--resolution", "16"), "use --resolution 24 or larger"),
    (("sample", "--kind", "px", "--resolution", "1"), "use --resolution 2 or larger"),
    (("sample", "--seed", "-1"), "--seed"),
    (("list", "--templates", "/nonexistent/t.json"), "not found"),
])
def test_cli_errors(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["list", "show", "sample"])
def test_cli_help_describes_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    for option in {"list": ["--kind", "--templates"], "show": ["--kind", "--templates"],
                   "sample": ["--kind", "--region", "--resolution", "--length", "--factor", "--seed", "--count"]}[command]:
        assert option in result.output
    assert "default" in result.output.lower() and "shipped" in result.output
