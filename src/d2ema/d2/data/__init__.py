"""Your own COCO-format datasets in detectron2: registered by name (`.datasets`) and checked
whole before training (`.coco_check`).

Example::

    from d2ema.d2 import register_coco_dataset

    register_coco_dataset("my_train", "annotations/train.json", "images/")
"""
