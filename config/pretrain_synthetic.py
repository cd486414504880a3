# Pre-train the tiny Chinese model of config/synthetic_zh.py with momentum contrast, as config/pretrain_chvtt.py
# does at full size: FAM + VTM + FTM + MLM, titles and tags, momentum encoders and queues. The data is the built-in
# synthetic_pretrain set (12,000 other videos; train.py makes it on first use), whose Chinese captions and tags
# play CHVTT's titles and tags; the check at every eval is the synthetic val split, and results.json holds the
# synthetic test split's metrics before any fine-tuning.
# $ python train.py config/pretrain_synthetic.py
# $ python train.py config/synthetic_zh.py --init_from=out-pretrain-synthetic/ckpt.pt --epochs=1   # fine-tune
# study.py runs this with each loss switched off in turn and other queue sizes, and compares with scratch.
out_dir = "out-pretrain-synthetic"
dataset = "synthetic_pretrain"
eval_dataset = "synthetic"
caption_field = "captions_zh"  # tags follow: tags_zh
text_encoder = "bert"
context_length = 24
eval_context_length = 24
tag_context_length = 16  # up to 14 tag characters with [CLS] and [SEP]
bert_pooling = "mean"  # see config/synthetic_zh.py
bert_dropout = 0.0
pretrain = True
use_tags = True
# One batch of keys: on this data larger queues learn less in the same steps (study.py measures 256 and 1024,
# the full-size recipe's): keys from up to 32 steps ago come from a momentum encoder that trained from scratch
# moves fast, and 12,000 videos with 1,596 distinct captions put ~4 copies of each caption among 1,024 negatives
queue_size = 32
momentum = 0.99
temperature = 0.07
proj_hidden = 256  # FAM projector width: 4096 at full size, over-sized for 64-wide towers
weight_fam = 0.05
weight_vtm = 0.45
weight_ftm = 0.45
weight_mlm = 0.05
epochs = 2  # 12,000 videos / 32 = 375 steps per epoch
