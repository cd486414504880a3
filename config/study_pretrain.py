# What pre-training is worth on the built-in data, over seeds. The paper's claim is a better final model: pre-train
# the tiny Chinese model with momentum contrast on the titles and tags of synthetic_pretrain (config/
# pretrain_synthetic.py: 750 steps), fine-tune for the full schedule of config/synthetic_zh.py (9 epochs, 1,683
# steps), and compare with the same schedule from scratch. The short schedule (1 epoch, 187 steps) asks for a better
# start, and there each loss is switched off in turn. Fine-tuning starts from the pre-training's best.pt, the weights
# of the table's "after stage 1" column.
# $ python study.py config/study_pretrain.py
# Estimated on one core (the tiny model fine-tunes 1,683 steps in ~1.8 min; a pre-training step costs ~1.8 times a
# fine-tuning one): scratch_full 1.8 min a seed, pretrained_full 3.2, scratch_short 0.2, pretrained_short 1.6 and each
# ablation 1.6; ~42 min of runs for 3 seeds, ~21 min on 2 idle cores (plus evaluations and start-up).
out_dir = "out-study-pretrain"
_pre = "config/pretrain_synthetic.py"
_full = "config/synthetic_zh.py"
_short = "config/synthetic_zh.py --epochs=1"
rows = {
    "scratch_full": _full,
    "pretrained_full": (_pre, _full),
    "scratch_short": _short,
    "pretrained_short": (_pre, _short),
    "no_fam_short": (_pre + " --weight_fam=0", _short),
    "no_vtm_short": (_pre + " --weight_vtm=0", _short),
    "no_ftm_short": (_pre + " --weight_ftm=0", _short),
    "no_mlm_short": (_pre + " --weight_mlm=0", _short),
}
baseline = "scratch_full"
seeds = (1, 2, 3)
