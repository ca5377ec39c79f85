W=/tmp/w8; R=$W/res; M=$W/m; D=$R/prefix
trtpy() { ( source /opt/trt86/env.sh; "$TRTPY" "$@" ) }
for g in kl:0 klr:1; do n=${g%%:*}; ( export CUDA_VISIBLE_DEVICES=${g##*:}; trtpy -m sq_export -q build "$M/$n.onnx" -o "$M/${n}0.engine" --batch 1:1:1 --seq 1:256:256 --opt-level 0 --json > "$D/${n}0.build.json" 2> "$D/${n}0.build.err"; echo "$(date +%T) ${n}0 build rc $?" >> "$D/log2" ) & done
wait
CUDA_VISIBLE_DEVICES=1 trtpy -m sq_export compare "$M/fp.onnx" "$M/kl.onnx" "$M/kl0.engine" "$M/klr.onnx" "$M/klr0.engine" --tokens "$M/t.npz" --perplexity --batches 0 --min-cosine -1 --min-top1 0 --json > "$D/compare0.json" 2> "$D/compare0.err"
echo "$(date +%T) compare0 rc $?" >> "$D/log2"; cp "$M/t.npz" "$D/"
