"""The public face: `from persam import ...` gives the library's own objects, and stays light."""

import subprocess
import sys

import persam


def test_every_public_name_is_the_librarys_own_object():
    from persam.data import concept, io
    from persam.method import gfsam, multi, pipeline

    owners = {"PerSAM": pipeline, "PerSAMF": pipeline, "GFSAM": gfsam, "learn_concept": pipeline, "segment": pipeline,
              "segment_objects": multi, "load_concept": concept, "save_concept": concept, "load_image": io,
              "load_mask": io}
    for name, module in owners.items():
        assert name in persam.__all__
        assert getattr(persam, name) is getattr(module, name)
    for name in persam.__all__:
        assert getattr(persam, name) is not None


def test_the_readme_imports_work_and_unknown_names_fail():
    from persam import (PerSAM, PerSAMF, learn_concept, load_concept, load_image, load_mask,  # noqa: F401
                        save_concept, segment_objects)

    try:
        persam.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name did not raise AttributeError")


def test_importing_persam_does_not_import_torch():
    code = "import sys, persam, persam.data.sources; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
