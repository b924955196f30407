using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Metrics.Musiq;

/// <summary>
/// MUSIQ's multi-scale patch representation (pyiqa/data/multiscale_trans_util.py, a port of the TF original's
/// preprocessing.py). Every image becomes one token sequence: for each resized scale, then the original resolution,
/// its non-overlapping P×P patches in row-major order, each a flattened (C, ky, kx) vector followed by three
/// channels — hashed spatial position, scale id, mask (1 = real patch, 0 = padding).
/// </summary>
public static class MusiqPatches
{
    /// <summary>
    /// Patches of every scale, concatenated along the sequence: [N, seq, 3·P²+3].
    /// </summary>
    /// <param name="image">[N, 3, H, W] in the network's range (pyiqa maps [0,1] to [−1,1] first).</param>
    /// <param name="patchSize">P.</param>
    /// <param name="patchStride">Stride between patches (= P in MUSIQ).</param>
    /// <param name="gridSize">G of the hashed spatial position grid.</param>
    /// <param name="longerSideLengths">Longer side of each resized scale; sorted ascending here, so the scale id is the rank.</param>
    /// <param name="maxSeqLenFromOriginalRes">null: no original-resolution scale; −1: all its patches; k ≥ 0: padded or cut to k.</param>
    public static Tensor Extract(Tensor image, int patchSize, int patchStride, int gridSize, IEnumerable<int> longerSideLengths,
        int? maxSeqLenFromOriginalRes)
    {
        using var scope = NewDisposeScope();
        if (image.dim() == 3) image = image.unsqueeze(0);
        long h = image.shape[2], w = image.shape[3];
        var lengths = longerSideLengths.OrderBy(l => l).ToArray();
        var outputs = new List<Tensor>();
        for (int scaleId = 0; scaleId < lengths.Length; scaleId++)
        {
            var (resized, _, _) = ResizePreserveAspectRatio(image, h, w, lengths[scaleId]);
            // int(np.ceil(L / s) ** 2): the token budget of a square image at this scale.
            var maxSeqLen = (int)Math.Pow(Math.Ceiling((double)lengths[scaleId] / patchStride), 2);
            outputs.Add(PatchesAndPositions(resized, patchSize, patchStride, gridSize, scaleId, maxSeqLen));
        }
        if (maxSeqLenFromOriginalRes is { } k)
            outputs.Add(PatchesAndPositions(image, patchSize, patchStride, gridSize, lengths.Length, k));
        return cat(outputs, -1).transpose(1, 2).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Aspect-preserving resize so that the longer side is <paramref name="longerSide"/>: rh = round(h·L/max(h,w)),
    /// rw likewise (Python's round, half to even), bicubic (A = −0.75, align_corners=False, no antialias; the TF
    /// original used a Gaussian kernel).
    /// </summary>
    public static (Tensor Resized, long Rh, long Rw) ResizePreserveAspectRatio(Tensor image, long h, long w, int longerSide)
    {
        var ratio = (double)longerSide / Math.Max(h, w);
        var rh = (long)Math.Round(h * ratio, MidpointRounding.ToEven);
        var rw = (long)Math.Round(w * ratio, MidpointRounding.ToEven);
        if (rh < 1 || rw < 1)
            throw new ArgumentException($"MUSIQ: a {h}×{w} image resized to longer side {longerSide} is {rh}×{rw}; the aspect ratio is too extreme");
        var resized = F.interpolate(image, new[] { rh, rw }, mode: InterpolationMode.Bicubic, align_corners: false);
        return (resized, rh, rw);
    }

    /// <summary>
    /// TF-'SAME' zero padding then non-overlapping patches (F.unfold): [N, C·k², count_h·count_w], each column a
    /// (C, ky, kx)-ordered patch. pad_total = (ceil(h/s) − 1)·s + k − h, of which ⌊pad_total/2⌋ goes top/left.
    /// </summary>
    public static Tensor ExtractImagePatches(Tensor x, int kernel, int stride)
    {
        long h = x.shape[2], w = x.shape[3];
        long h2 = (h + stride - 1) / stride, w2 = (w + stride - 1) / stride;
        long padRow = (h2 - 1) * stride + kernel - h;
        long padCol = (w2 - 1) * stride + kernel - w;
        using var padded = F.pad(x, new[] { padCol / 2, padCol - padCol / 2, padRow / 2, padRow - padRow / 2 }, PaddingModes.Constant, 0);
        return F.unfold(padded, kernel, dilation: 1, padding: 0, stride: stride);
    }

    /// <summary>
    /// Hashed spatial position of each patch of a count_h × count_w grid, row-major, as float [1, count_h·count_w]:
    /// hash_h·G + hash_w with hash = nearest-neighbour resize of arange(G) to count (PyTorch's 'nearest':
    /// ⌊i · (float)G / count⌋, computed by the same kernel).
    /// </summary>
    public static Tensor HashedSpatialPositions(int gridSize, long countH, long countW)
    {
        using var scope = NewDisposeScope();
        var grid = arange(gridSize, dtype: ScalarType.Float32).reshape(1, 1, gridSize);
        var hashW = F.interpolate(grid, new[] { countW }, mode: InterpolationMode.Nearest).repeat(1, countH, 1);
        var hashH = F.interpolate(grid, new[] { countH }, mode: InterpolationMode.Nearest).transpose(1, 2).repeat(1, 1, countW);
        return (hashH * gridSize + hashW).reshape(1, -1).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// One scale: patches [N, C·P², L] with three rows appended (spatial position, scale id, mask = 1), then, for
    /// maxSeqLen ≥ 0, zero-padded or cut to maxSeqLen columns (padding columns are all zero: mask 0). [N, C·P²+3, L'].
    /// </summary>
    public static Tensor PatchesAndPositions(Tensor image, int patchSize, int patchStride, int gridSize, int scaleId, int maxSeqLen)
    {
        using var scope = NewDisposeScope();
        long n = image.shape[0], h = image.shape[2], w = image.shape[3];
        var p = ExtractImagePatches(image, patchSize, patchStride);
        long countH = (h + patchStride - 1) / patchStride, countW = (w + patchStride - 1) / patchStride;
        var spatial = HashedSpatialPositions(gridSize, countH, countW).unsqueeze(1).repeat(n, 1, 1).to(p.dtype, p.device);
        var scale = full_like(spatial, scaleId);
        var mask = ones_like(spatial);
        var o = cat(new[] { p, spatial, scale, mask }, 1);
        if (maxSeqLen >= 0)
        {
            var padding = zeros(o.shape[0], o.shape[1], maxSeqLen, dtype: o.dtype, device: o.device);
            o = cat(new[] { o, padding }, -1)[.., .., ..maxSeqLen];
        }
        return o.MoveToOuterDisposeScope();
    }
}
