"""The method: one module per step of PerSAM, composed by `pipeline`. Imports only `sam`.

    target    step 1: the reference's target embedding and local features
    locate    step 2: the similarity map and the positive / negative points
    guide     target-guided attention and target-semantic prompting
    refine    cascaded post-refinement (mask, then box)
    finetune  PerSAM-F's two learned weights
    pipeline  the steps composed: learn a concept, segment one or several encoded images
    multi     several objects in one image
    video     the tracking loop of PerSAM's video method
"""
