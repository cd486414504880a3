# Why the paper's long queue (1,024 keys) pre-trains worse than one batch of keys (32) on the built-in data: one
# probe per hypothesis, each a pair of rows whose gap (queue_1024 - queue_32) is compared with the plain pair's.
# Short budget: one epoch of config/pretrain_synthetic.py (375 steps); the metric is the pre-trained model's T2V R@1
# on the synthetic test split, before any fine-tuning.
# - Stale keys: a queue of 1,024 at batch 32 holds keys from up to 32 steps ago, made by a momentum encoder that moves
#   fast while the towers learn from scratch at lr 1e-3. If that is the cause, the gap shrinks when the encoders move
#   slower: a momentum of 0.999 (MoCo's; keys of one queue then come from nearly the same encoder), or lr 3e-4.
# - Duplicate positives: 12,000 videos share 285 distinct titles, so 1,024 random negatives hold ~11 copies of a
#   video's own title (832 distinct tag strings: ~28 copies of its tags); the full captions (1,596 distinct) put ~4
#   of each (prepare_synthetic prints the counts). If copies are the cause, the gap shrinks on the full captions.
# - The last pair repeats the stale-key probe on the full captions, where the long queue falls behind (the titles
#   show no deficit to shrink: docs/results.md).
# $ python study.py config/study_queue.py
# Estimated on one core: 375 pre-training steps ~0.7 min a run (a step costs ~1.8 fine-tuning steps, 187 of which
# take ~12 s); 10 rows x 3 seeds ~21 min of runs, ~11 min on 2 idle cores (plus evaluations and start-up).
out_dir = "out-study-queue"
_pre = "config/pretrain_synthetic.py --epochs=1"
_long = " --queue_size=1024"
_slow = " --momentum=0.999"
_low_lr = " --learning_rate=3e-4 --text_lr=3e-4"
_captions = " --caption_field=captions_full_zh --eval_caption_field=captions_zh"  # tags follow: tags_full_zh
rows = {
    "queue_32": _pre,
    "queue_1024": _pre + _long,
    "queue_32_m0999": _pre + _slow,
    "queue_1024_m0999": _pre + _long + _slow,
    "queue_32_lr3e-4": _pre + _low_lr,
    "queue_1024_lr3e-4": _pre + _long + _low_lr,
    "queue_32_captions": _pre + _captions,
    "queue_1024_captions": _pre + _long + _captions,
    "queue_32_captions_m0999": _pre + _captions + _slow,
    "queue_1024_captions_m0999": _pre + _long + _captions + _slow,
}
baseline = "queue_32"
seeds = (1, 2, 3)
