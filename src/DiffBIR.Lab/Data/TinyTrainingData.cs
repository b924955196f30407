using DiffBIR.Lab.Degradation;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Data;

/// <summary>
/// The tiny recipe's training set: <see cref="Count"/> procedural HQ images (indices 0 … Count − 1 of the family of
/// <see cref="Seed"/>) at <see cref="Size"/> px, each with one low-quality version made by the first-order
/// degradation (Eq. 2) at full size, and a seeded sampler of aligned random crops with horizontal flips. Held-out
/// images for evaluation use indices from <see cref="HeldOutStart"/> on, which training never touches.
/// Everything lives in two CPU float32 tensors [N, 3, H, W] in [0, 1].
/// </summary>
public sealed class TinyTrainingData : IDisposable
{
    /// <summary>First image index of the held-out set (far above any training pool).</summary>
    public const long HeldOutStart = 1_000_000;

    /// <summary>
    /// The degradation of the tiny recipe: Eq. 2 with the spatial ranges scaled to 64–128-px images (train_stage1.yaml's
    /// are for 512 px: σ up to 12 and r up to 12 leave nothing of a 128-px image): blur σ ∈ [0.1, 3] (21-tap kernels),
    /// downsample r ∈ [1, 4]; noise and JPEG act per pixel and per 8×8 block whatever the image size, so they keep the
    /// official ranges: noise δ ∈ [0, 15], JPEG q ∈ [30, 100].
    /// </summary>
    public static FirstOrderDegradation Degradation { get; } = new()
    {
        BlurKernelSize = 21,
        BlurSigma = new ValueRange(0.1, 3),
        DownsampleRange = new ValueRange(1, 4),
        NoiseRange = new ValueRange(0, 15),
        JpegRange = new ValueRange(30, 100),
    };

    public long Seed { get; }
    public int Count { get; }
    public int Size { get; }
    /// <summary>HQ images [N, 3, Size, Size] in [0, 1].</summary>
    public Tensor Hq { get; }
    /// <summary>Their degraded versions, same shape.</summary>
    public Tensor Lq { get; }

    SeededDegradationRandom _sampler;

    /// <param name="log">progress lines (optional)</param>
    public TinyTrainingData(long seed, int count, int size, Action<string>? log = null)
    {
        Seed = seed; Count = count; Size = size;
        var hq = new Tensor[count];
        var lq = new Tensor[count];
        for (int i = 0; i < count; i++)
        {
            hq[i] = ProceduralImages.Generate(seed, i, size);
            lq[i] = DegradeOne(hq[i], seed, i);
            if (log != null && (i + 1) % 256 == 0) log($"data: {i + 1}/{count} images");
        }
        Hq = torch.stack(hq); Lq = torch.stack(lq);
        foreach (var t in hq.Concat(lq)) t.Dispose();
        _sampler = new SeededDegradationRandom((ulong)seed ^ 0x5EED5A3B1E5UL);
    }

    /// <summary>The LQ version of one image: Eq. 2 with a generator seeded by (seed, index), so any image's LQ can be
    /// remade alone (the held-out set uses the same function).</summary>
    public static Tensor DegradeOne(Tensor hq, long seed, long index) => DegradeWithSize(hq, seed, index).Lq;

    /// <summary><see cref="DegradeOne"/> and the size ⌊H/r⌋ × ⌊W/r⌋ the image was downsampled to (for a bicubic baseline).</summary>
    public static (Tensor Lq, int SmallHeight, int SmallWidth) DegradeWithSize(Tensor hq, long seed, long index)
    {
        var rng = new SeededDegradationRandom(((ulong)seed * 0x9E3779B97F4A7C15UL) ^ ((ulong)index + 0xD1B54A32D192ED03UL));
        using var d = Degradation.Degrade(hq, rng);
        return (d.Lq.clamp(0.0, 1.0), d.Parameters.SmallHeight, d.Parameters.SmallWidth);
    }

    /// <summary>
    /// A batch of <paramref name="batch"/> aligned crops of side <paramref name="crop"/> (a multiple of 8, at offsets
    /// that are multiples of 8) with random horizontal flips: (HQ, LQ) [B, 3, crop, crop] in [0, 1].
    /// </summary>
    public (Tensor Hq, Tensor Lq) Sample(int batch, int crop)
    {
        if (crop % 8 != 0 || crop > Size) throw new ArgumentException($"crop {crop} must be a multiple of 8 and at most {Size}");
        using var scope = torch.NewDisposeScope();
        var hs = new List<Tensor>(); var ls = new List<Tensor>();
        int cells = (Size - crop) / 8 + 1;
        for (int b = 0; b < batch; b++)
        {
            long i = (long)(_sampler.NextDouble() * Count);
            long y = 8L * (int)(_sampler.NextDouble() * cells), x = 8L * (int)(_sampler.NextDouble() * cells);
            bool flip = _sampler.NextDouble() < 0.5;
            var h = Hq[i, .., TensorIndex.Slice(y, y + crop), TensorIndex.Slice(x, x + crop)];
            var l = Lq[i, .., TensorIndex.Slice(y, y + crop), TensorIndex.Slice(x, x + crop)];
            if (flip) { h = h.flip(2); l = l.flip(2); }
            hs.Add(h); ls.Add(l);
        }
        return (torch.stack(hs).contiguous().MoveToOuterDisposeScope(), torch.stack(ls).contiguous().MoveToOuterDisposeScope());
    }

    /// <summary>Restarts the crop sampler as if the data were new (runs that must see the same batches, e.g. the
    /// variants of Table 1 in miniature, share one data set).</summary>
    public void RestartSampler() => _sampler = new SeededDegradationRandom((ulong)Seed ^ 0x5EED5A3B1E5UL);

    /// <summary>Indices of <paramref name="batch"/> whole images (for stages that train at full size).</summary>
    public long[] SampleIndices(int batch)
    {
        var r = new long[batch];
        for (int b = 0; b < batch; b++) r[b] = (long)(_sampler.NextDouble() * Count);
        return r;
    }

    public void Dispose() { Hq.Dispose(); Lq.Dispose(); }
}
