# What pre-training is worth on the built-in data, over seeds: pre-train the tiny Chinese model with momentum
# contrast (config/pretrain_synthetic.py) and with each loss off, fine-tune each checkpoint, and compare with the
# same fine-tuning from scratch.
# $ python study.py config/study_pretrain.py
out_dir = "out-study-pretrain"
_pre = "config/pretrain_synthetic.py --epochs=2"
_fine = "config/synthetic_zh.py --epochs=1"
rows = {
    "scratch": _fine,
    "full": (_pre, _fine),
    "no_fam": (_pre + " --weight_fam=0", _fine),
    "no_vtm": (_pre + " --weight_vtm=0", _fine),
    "no_ftm": (_pre + " --weight_ftm=0", _fine),
    "no_mlm": (_pre + " --weight_mlm=0", _fine),
}
seeds = (1, 2, 3)
