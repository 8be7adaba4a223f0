"""Data formats: images and masks (`io`), target SOURCEs (`sources`, with the local walk in
`listing` and object stores in `uri_sources`), video frames (`frames`) and the overlay video
(`video_writer`), pictures people look at (`visualize`), COCO instances (`coco`) and concept
files (`concept`). Imports `persam.errors`, `persam.method` and `sam` only."""
