# Pre-train the tiny Chinese model of config/synthetic_zh.py with momentum contrast, as config/pretrain_chvtt.py
# does at full size: FAM + VTM + FTM + MLM, titles and tags, momentum encoders and queues. The data is the built-in
# synthetic_pretrain set (12,000 other videos; train.py makes it on first use), whose titles and tags play CHVTT's:
# they name the objects and at most the first direction, never what the fine-tuning captions add (synthetic.py),
# and none is a test caption. The check at every eval is the synthetic val split, and results.json holds the
# synthetic test split's metrics before any fine-tuning.
# $ python train.py config/pretrain_synthetic.py
# $ python train.py config/synthetic_zh.py --init_from=out-pretrain-synthetic/best.pt   # fine-tune
# config/study_pretrain.py compares fine-tuning from it with fine-tuning from scratch, and switches each loss off in
# turn; config/study_queue.py probes longer queues.
out_dir = "out-pretrain-synthetic"
dataset = "synthetic_pretrain"
eval_dataset = "synthetic"
caption_field = "captions_zh"  # the titles; tags follow: tags_zh (the full captions: captions_full_zh)
text_encoder = "bert"
context_length = 24
eval_context_length = 24
tag_context_length = 16  # up to 14 tag characters with [CLS] and [SEP]
bert_pooling = "mean"  # see config/synthetic_zh.py
bert_dropout = 0.0
pretrain = True
# One batch of keys. On these titles the paper's 1,024 keys pre-train as well (config/study_queue.py); on the full
# captions they fall behind, which a slower momentum encoder (stale keys) reproduces and duplicate titles do not
# explain (docs/results.md, "The paper's long queue")
queue_size = 32
proj_hidden = 256  # FAM projector width: 4096 at full size, over-sized for 64-wide towers
text_lr = 1e-3  # the BERT with mean pooling learns at the video towers' rate, as in config/synthetic_zh.py
epochs = 2  # 12,000 videos / 32 = 375 steps per epoch
