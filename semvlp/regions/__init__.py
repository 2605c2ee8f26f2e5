"""Region extraction: detector backends (torchvision, detectron2), bottom-up-attention box selection,
feature files per image set, and training of the embedded world's tiny detector.

Modules: `selection` (which proposals become regions), `torchvision_backend`, `detectron2_backend`
(optional dependency, imported lazily), `extract` (registry, common extractor, `extract_image_set`),
`train` (`train_detector`).
"""
