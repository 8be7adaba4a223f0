"""SAM 2.1 in the model layer: Hiera image encoder with its FPN neck, prompt encoder, mask decoder,
memory encoder / attention and the video tracker, with Meta's checkpoint key names."""
