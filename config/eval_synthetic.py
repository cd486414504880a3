# Evaluate on the built-in synthetic test split (208 videos of moving shapes, one unique caption each; `python
# prepare.py synthetic` writes it). Chance R@1 is 0.5%; a frame-level model is held near 1/group-size because
# direction and order are invisible in single frames.
# $ python train.py && python eval.py config/eval_synthetic.py --init_from=out-synthetic/ckpt.pt
# For the Chinese side: --caption_field=captions_zh (with a checkpoint trained on it).
dataset = "synthetic"
split = "test"
num_workers = 0
