using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>A tile: rows [Top, Bottom) and columns [Left, Right).</summary>
public readonly record struct Tile(int Top, int Bottom, int Left, int Right);

/// <summary>
/// Tiled processing as the official code does it (diffbir/utils/common.py): sliding windows that always end flush
/// with the border, and gaussian blending weights.
/// </summary>
public static class Tiling
{
    /// <summary>Windows of <paramref name="size"/> every <paramref name="stride"/>, plus one flush with the far edge when the stride does not land there.</summary>
    public static IReadOnlyList<Tile> SlidingWindows(int h, int w, int size, int stride)
    {
        static List<int> Starts(int n, int size, int stride)
        {
            var s = new List<int>();
            for (int i = 0; i <= n - size; i += stride) s.Add(i);
            if ((n - size) % stride != 0) s.Add(n - size);
            return s;
        }
        var tiles = new List<Tile>();
        foreach (var hi in Starts(h, size, stride))
            foreach (var wi in Starts(w, size, stride))
                tiles.Add(new Tile(hi, hi + size, wi, wi + size));
        return tiles;
    }

    /// <summary>
    /// Gaussian tile weights [height, width] in float64 (official <c>gaussian_weights</c>, from CCSR): variance 0.01
    /// of the normalised coordinate. As in the official code the x midpoint is (width − 1)/2 but the y midpoint is
    /// height/2, so the weights are not symmetric vertically; we keep that for parity.
    /// </summary>
    public static double[,] GaussianWeights(int width, int height)
    {
        const double var = 0.01;
        double norm = Math.Sqrt(2 * Math.PI * var);
        double mx = (width - 1) / 2.0, my = height / 2.0;
        var xs = Enumerable.Range(0, width).Select(x => Math.Exp(-(x - mx) * (x - mx) / ((double)width * width) / (2 * var)) / norm).ToArray();
        var ys = Enumerable.Range(0, height).Select(y => Math.Exp(-(y - my) * (y - my) / ((double)height * height) / (2 * var)) / norm).ToArray();
        var wts = new double[height, width];
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++)
                wts[y, x] = ys[y] * xs[x];
        return wts;
    }

    /// <summary>The gaussian weights as a [1,1,H,W] tensor of the given dtype.</summary>
    public static Tensor GaussianWeightsTensor(int width, int height, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var w = GaussianWeights(width, height);
        var flat = new double[height * width];
        Buffer.BlockCopy(w, 0, flat, 0, flat.Length * sizeof(double));
        return torch.tensor(flat, ScalarType.Float64).reshape(1, 1, height, width).to(dtype, device ?? torch.CPU);
    }

    /// <summary>
    /// Applies <paramref name="fn"/> tile by tile and blends the results with gaussian (or uniform) weights
    /// (official <c>make_tiled_fn</c>). The output may be <paramref name="scale"/> times larger ("up") or smaller
    /// ("down") than the input, with <paramref name="outChannels"/> channels. Each tile runs in its own DisposeScope.
    /// </summary>
    public static Tensor Apply(Tensor x, Func<Tensor, Tile, Tensor> fn, int size, int stride, double scale = 1, bool scaleUp = true,
        long? outChannels = null, bool gaussian = true)
    {
        int Scale(int n) => scaleUp ? (int)(n * scale) : (int)Math.Floor(n / scale);
        long b = x.shape[0], c = x.shape[1];
        int h = (int)x.shape[2], w = (int)x.shape[3];
        var dtype = x.dtype;
        var outT = torch.zeros(new[] { b, outChannels ?? c, Scale(h), Scale(w) }, dtype, x.device);
        using var count = torch.zeros(outT.shape, ScalarType.Float32, x.device);
        int ws = Scale(size);
        using var weights = gaussian ? GaussianWeightsTensor(ws, ws, dtype, x.device) : torch.ones(new long[] { 1, 1, ws, ws }, dtype, x.device);
        foreach (var t in SlidingWindows(h, w, size, stride))
        {
            using var scope = torch.NewDisposeScope();
            var tile = x[.., .., t.Top..t.Bottom, t.Left..t.Right];
            var y = fn(tile, t);
            var (oh0, oh1, ow0, ow1) = (Scale(t.Top), Scale(t.Bottom), Scale(t.Left), Scale(t.Right));
            outT[.., .., oh0..oh1, ow0..ow1].add_(y * weights);
            count[.., .., oh0..oh1, ow0..ow1].add_(weights);
        }
        var result = outT / count;
        outT.Dispose();
        return result;
    }
}
