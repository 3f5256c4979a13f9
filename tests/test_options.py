"""ExpandOptions refuses or normalises every value in its constructor (issue 7, items 7, 16, 17)."""
import numpy as np
import pytest

from cogalign.options import MAX_SEED, ExpandOptions
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


@pytest.mark.parametrize("changes, message", [
    ({"targets": "p"}, "--targets"),
    ({"targets": "vq,rgb"}, "--targets"),
    ({"targets": 5}, "--targets"),
    ({"regions": "middle"}, "unknown region 'middle'"),
    ({"vq_resolution": "big"}, "--vq-resolution"),
    ({"px_resolution": (16,)}, "--px-resolution"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**64}, "--seed"),
    ({"seed": "3"}, "--seed"),
    ({"seed": 1.5}, "--seed"),
    ({"max_image_pixels": 0}, "--max-image-pixels"),
    ({"max_image_pixels": 2**64}, "--max-image-pixels"),
    ({"px_resolution": 1}, "--regions upper-left cannot be cut at --px-resolution 1x1"),
    ({"regions": "center", "px_resolution": 2}, "use --px-resolution 3 or larger"),
])
def test_bad_values_are_refused_in_the_constructor(changes, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        ExpandOptions(**changes)


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
