"""ExpandOptions refuses or normalises every value in its constructor (issue 7, items 7, 16, 17)."""
import numpy as np
import pytest

from cogalign.options import MAX_SEED, ExpandOptions
from cogalign.cli.util import error_text
from cogalign.errors import OptionError
from cogalign.targets.regions import QUARTERS
from tests.helpers import EXAMPLES, run_module


def test_strings_and_ints_are_normalised():
    opts = ExpandOptions(targets="px", regions="quarters,center", vq_resolution=448, px_resolution="16x32")
    assert opts.targets == ("px",)
    assert opts.regions == QUARTERS + ("center",)
    assert (opts.vq_resolution, opts.px_resolution) == ((448, 448), (16, 32))
    assert ExpandOptions(targets=["vq", "px", "vq"]).targets == ("vq", "px")
    assert opts.fingerprint() == ExpandOptions(targets=("px",), regions=QUARTERS + ("center",),
                                               vq_resolution=(448, 448), px_resolution=(16, 32)).fingerprint()
    assert opts.replace(seed=3).targets == ("px",)


@pytest.mark.parametrize("changes, message, cli", [
    ({"targets": "p"}, "targets='p'", "--targets 'p'"),
    ({"targets": "vq,rgb"}, "targets='vq,rgb'", "--targets 'vq,rgb'"),
    ({"targets": 5}, "targets=5", "--targets 5"),
    ({"regions": "middle"}, "regions: unknown region 'middle'", "--regions: unknown region 'middle'"),
    ({"vq_resolution": "big"}, "vq_resolution='big'", "--vq-resolution 'big'"),
    ({"px_resolution": (16,)}, "px_resolution=(16,)", "--px-resolution (16,)"),
    ({"seed": -1}, "seed=-1", "--seed -1"),
    ({"seed": 2**64}, "seed=18446744073709551616", "--seed 18446744073709551616"),
    ({"seed": "3"}, "seed='3'", "--seed '3'"),
    ({"seed": 1.5}, "seed=1.5", "--seed 1.5"),
    ({"max_image_pixels": 0}, "max_image_pixels=0", "--max-image-pixels 0"),
    ({"max_image_pixels": 2**64}, "max_image_pixels=", "--max-image-pixels "),
    ({"px_resolution": 1}, "regions upper-left cannot be cut at px_resolution=1x1",
     "--regions upper-left cannot be cut at --px-resolution 1x1"),
    ({"regions": "center", "px_resolution": 2}, "use px_resolution=3 or larger", "use --px-resolution 3 or larger"),
    ({"vq_precision": "half"}, "vq_precision='half': choose from", "--precision 'half': choose from"),
    ({"format": "jsonl", "embed_images": True}, "embed_images needs format parquet", "--embed-images needs --format parquet"),
    # a switch given as a string was truthy: allow_absolute_paths="false" read files outside the image root
    ({"allow_absolute_paths": "false"}, "allow_absolute_paths='false': give True or False",
     "--allow-absolute-paths 'false': give True or False"),
    ({"embed_images": "yes"}, "embed_images='yes'", "--embed-images 'yes'"),
    ({"vq_channels_last": 1}, "vq_channels_last=1", "--channels-last 1"),
    ({"vq_compile": None}, "vq_compile None: give True or False", "--compile None"),
])
def test_bad_values_are_refused_in_the_constructor(changes, message, cli):
    """From Python the error names the parameter the caller passed (issue 17, item 11); the CLI's
    wording (`cli_message`, what `fail` prints) names the flag."""
    with pytest.raises(OptionError) as err:
        ExpandOptions(**changes)
    assert message in str(err.value) and "--" not in str(err.value), str(err.value)
    assert cli in err.value.cli_message and cli in error_text(err.value)


def test_px_regions_are_checked_only_when_px_is_produced():
    assert ExpandOptions(targets="vq", px_resolution=1).px_resolution == (1, 1)
    assert ExpandOptions(seed=MAX_SEED).seed == MAX_SEED
    seed = ExpandOptions(seed=np.int64(7)).seed
    assert seed == 7 and type(seed) is int


@pytest.mark.parametrize("args, message", [
    (["--vq-resolution", "8x64", "--regions", "upper-left"], "use --vq-resolution 16x64 or larger"),
    (["--vq-resolution", "8"], "--regions upper-left cannot be cut at --vq-resolution 8x8"),
    (["--px-resolution", "1"], "use --px-resolution 2 or larger"),
    (["--regions", "center", "--vq-resolution", "16"], "use --vq-resolution 24 or larger"),
    (["--seed", "-1"], "--seed"),
    (["--max-image-pixels", str(10**23)], "--max-image-pixels 100000000000000000000000: must be an integer"),
    (["--vq-resolution", "8192", "--targets", "vq"], "--vq-resolution 8192x8192: one image needs more than"),
])
def test_expand_refuses_before_the_run_starts(tmp_path, args, message):
    out = tmp_path / "out"
    proc = run_module("expand", EXAMPLES, "--out", out, "--no-progress", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "data").exists()


def test_expand_from_python_names_its_parameters(tmp_path):
    """`expand()`'s own refusals name `Runtime`'s and `ExpandOptions`' fields; the CLI names the flags."""
    from cogalign.expand.executor import Runtime, expand

    with pytest.raises(OptionError) as err:
        expand(EXAMPLES, tmp_path / "a", ExpandOptions(targets="px"), Runtime(workers=0, num_slices=2, slice_index=3))
    assert "slice_index=3 must be in 0..1 (num_slices=2)" in str(err.value)
    assert "--shard-index 3 must be in 0..1 (--num-shards 2)" in err.value.cli_message
    with pytest.raises(OptionError) as err:
        expand(EXAMPLES, tmp_path / "b", ExpandOptions(targets="vq", regions="full", vq_resolution=20),
               Runtime(workers=0))
    assert str(err.value).startswith("vq_resolution=20x20 is not a multiple") and "--" not in str(err.value)
    with pytest.raises(OptionError) as err:  # the tokenizer's own memory check, worded for the caller too
        expand(EXAMPLES, tmp_path / "d", ExpandOptions(targets="vq", vq_resolution=8192), Runtime(workers=0))
    assert str(err.value).startswith("vq_resolution=8192x8192: one image needs") and "--" not in str(err.value)
    proc = run_module("expand", EXAMPLES, "--out", tmp_path / "c", "--targets", "vq", "--regions", "full",
                      "--vq-resolution", "20", "--no-progress", check=False)
    assert proc.returncode == 2 and "error: --vq-resolution 20x20 is not a multiple" in proc.stderr, proc.stderr


@pytest.mark.parametrize("changes, message", [
    ({"workers": -1}, "workers=-1: an integer from 0 to 1024"),  # was: ValueError min() arg is an empty sequence
    ({"workers": "2"}, "workers='2'"),  # was: TypeError unsupported operand type(s) for /
    ({"workers": 2.5}, "workers=2.5"),
    ({"batch_size": 0}, "batch_size=0: an integer from 1 to 4096"),
    ({"shard_size": 0}, "shard_size=0"),
    ({"memory_budget": "1x"}, "memory_budget='1x' is not a size"),  # was: TypeError for //
    ({"memory_budget": 0}, "memory_budget=0"),
    ({"trust_pickle": "no"}, "trust_pickle='no': give True or False"),  # truthy: would have trusted pickles
    ({"overwrite": "false"}, "overwrite='false'"),
])
def test_runtime_refuses_bad_values_in_the_constructor(changes, message):
    """`Runtime` took any value from Python; the run then died with a traceback far from the cause."""
    from cogalign.expand.executor import Runtime

    with pytest.raises(OptionError) as err:
        Runtime(**changes)
    assert message in str(err.value) and "--" not in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_runtime_takes_the_clis_strings_and_numpy_integers():
    from cogalign.expand.executor import Runtime

    runtime = Runtime(memory_budget="512MB", workers=np.int64(3), shard_size=np.int32(5))
    assert (runtime.memory_budget, runtime.workers, runtime.shard_size) == (512 * 1000 ** 2, 3, 5)
    assert type(runtime.workers) is int
