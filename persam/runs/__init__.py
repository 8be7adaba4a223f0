"""Runs: the one place for option defaults (`defaults`), model loading (`models`), a run's records and
file names (`records`), its settings key (`key`), the folder lock (`lock`), the output folder and
its promises (`folder`), the local engine (`local`), the Ray engine (`engine_ray`) and videos
(`track`, with `track_reference`). Imports the layers below it."""
