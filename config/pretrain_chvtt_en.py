# Pre-train HMMC on CHVTT with the English titles and tags (title_eng/tag_eng) and the CLIP text tower: the run
# behind the original README's MSR-VTT fine-tuning, whose --init_model is
# FAM0_VTM0.45_FTM0.45_MLM0_m0.99_q1024_f30_whole/pytorch_model.bin.2: FAM weight 0, no MLM (English MLM is a config
# error: CLIP's text tower is causal), the whole CHVTT corpus (data/chvtt as prepared, no subset), and the
# checkpoint after the third epoch, kept here as ckpt_epoch3.pt (the original numbered its files from 0).
# $ torchrun --standalone --nproc_per_node=8 train.py config/pretrain_chvtt_en.py
# Frames: data/chvtt extracted at --frame_size=360 (README, Data). The zero-shot check runs on MSR-VTT 1k-A.
# Epochs and schedule as the Chinese run's (the folder name gives none).
# Batch: 128 videos per step = 16 per GPU x 8 GPUs x 1; queue 1024 = 8 global batches.
out_dir = "out-pretrain-chvtt-en"
dataset = "chvtt"
eval_dataset = "msrvtt"
eval_caption_field = "captions"
init_from = "clip"
caption_field = "captions_en"  # and tags_en
pretrain = True
num_frames = 12
image_size = 224
context_length = 45
eval_context_length = 32  # the benchmarks' caption length, whatever the training length
frame_sample = "random"
augment = "frame"
temporal_layers = 4
weight_fam = 0.0  # "FAM0" (the paper's Chinese run: 0.05)
weight_mlm = 0.0  # "MLM0"
batch_size = 128
epochs = 11
learning_rate = 1e-4
clip_lr_scale = 1e-3
weight_decay = 0.05
warmup_proportion = 0.2
eval_batch_size = 128
num_workers = 8
log_interval = 50
eval_interval = 596
keep_epoch_checkpoints = True  # config/finetune_msrvtt.py starts from ckpt_epoch3.pt
