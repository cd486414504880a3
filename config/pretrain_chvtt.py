# Pre-train HMMC on CHVTT (Chinese titles + tags) with momentum contrast: FAM + VTM + FTM + MLM.
# $ torchrun --standalone --nproc_per_node=8 train.py config/pretrain_chvtt.py
# Needs: data/chvtt (python prepare.py frames --videos=CHVTT_VIDEOS --out=data/chvtt/frames.lmdb --num_frames=48
#        --frame_size=360, so that the 224-px crops are rarely upsampled (README, Data), and python prepare.py
#        chvtt ... --out=data/chvtt), data/vatex for the zero-shot eval, OpenAI's ViT-B-32.pt and the HF folder of
#        hfl/chinese-roberta-wwm-ext.
# Batch: 128 videos per step = 16 per GPU x 8 GPUs x 1 accumulation step (the README's run); on 4 GPUs it is
# 32 per GPU, or --gradient_accumulation_steps=2 at 16 per GPU. The queue (1024) must stay a multiple of 128.
# About 76k videos / 128 = 596 steps per epoch, 11 epochs = 6,556 steps with 20% warm-up (the original's defaults).
out_dir = "out-pretrain-chvtt"
dataset = "chvtt"
eval_dataset = "vatex"  # zero-shot check on Chinese VATEX test, as the original's --language chinese did
eval_caption_field = "captions_zh"
init_from = "clip"
text_encoder = "bert"
bert_path = "chinese-roberta-wwm-ext"  # its vocab.txt is the tokenizer
# caption_field = "captions" (the default): CHVTT's own language is Chinese; tags follow the caption field
pretrain = True
# use_tags = True (the default): the paper; the released code silently ran title-only: use_tags=False reproduces it
num_frames = 12
image_size = 224
context_length = 45  # CHVTT titles
eval_context_length = 32  # the benchmarks' caption length, whatever the training length
frame_sample = "random"
augment = "frame"  # SimCLR-style augmentation per frame, as released
temporal_layers = 4
batch_size = 128
epochs = 11
learning_rate = 1e-4
clip_lr_scale = 1e-3  # CLIP vision tower at 1e-7
weight_decay = 0.05
warmup_proportion = 0.2
eval_batch_size = 128
num_workers = 8
log_interval = 50
eval_interval = 596  # once per epoch, as the original
