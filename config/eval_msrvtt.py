# Evaluate on MSR-VTT 1k-A: 1,000 test videos, one caption each (the JSFusion split), T2V and V2T.
# $ python eval.py config/eval_msrvtt.py --init_from=out-finetune-msrvtt/ckpt.pt
# $ python eval.py config/eval_msrvtt.py --init_from=clip --clip_path=ViT-B-32.pt   # zero-shot CLIP, mean pooling
# Frame count, image size, caption length and the top-k of hierarchical matching come from the checkpoint's training
# config (the paper: 12 frames, 224 px, 32 tokens, top-2 frames after MSR-VTT fine-tuning, top-3 otherwise);
# set them here or with --top_k_frames=... only to deviate.
dataset = "msrvtt"
split = "test"
caption_field = "captions"
