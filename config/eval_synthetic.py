# Evaluate on the built-in synthetic test split (204 videos of moving shapes, one unique caption each; `python
# prepare.py synthetic` writes it). Chance R@1 is 0.5%; a frame-level model is held near 1/group-size because
# direction and order are invisible in single frames.
# $ python train.py && python eval.py config/eval_synthetic.py --init_from=out-synthetic/ckpt.pt
# A Chinese checkpoint (python train.py config/synthetic_zh.py) is scored on captions_zh: the field, the
# tokenizer and the caption length come with the checkpoint.
dataset = "synthetic"
split = "test"
num_workers = 0
