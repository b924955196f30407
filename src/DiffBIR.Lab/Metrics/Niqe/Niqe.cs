using System.Globalization;
using DiffBIR.Lab.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Niqe;

/// <summary>
/// The pristine model of NIQE: the mean and covariance of the 36 natural-scene-statistics features of sharp blocks of
/// pristine images (a multivariate Gaussian), the block size it was fitted with, and where it comes from.
/// </summary>
public sealed record NiqeModel(double[] Mu, double[,] Cov, int BlockSize, string Source, int Blocks, int Images)
{
    public const int Features = 36;

    /// <summary>Writes the model as safetensors (float64 <c>mu</c> [36], <c>cov</c> [36, 36]; block size and source as metadata).</summary>
    public void Save(string path)
    {
        using var scope = torch.NewDisposeScope();
        var cov = new double[Features * Features];
        for (int i = 0; i < Features; i++) for (int j = 0; j < Features; j++) cov[i * Features + j] = Cov[i, j];
        var t = new Dictionary<string, Tensor>
        {
            ["mu"] = torch.tensor(Mu, ScalarType.Float64),
            ["cov"] = torch.tensor(cov, new long[] { Features, Features }, ScalarType.Float64),
        };
        SafeTensors.Save(path, t, new Dictionary<string, string>
        {
            ["block_size"] = BlockSize.ToString(CultureInfo.InvariantCulture),
            ["source"] = Source,
            ["blocks"] = Blocks.ToString(CultureInfo.InvariantCulture),
            ["images"] = Images.ToString(CultureInfo.InvariantCulture),
            ["producer"] = "DiffBIR.Lab NIQE fit (Mittal et al. 2013, MATLAB estimatemodelparam)",
        });
    }

    /// <summary>Reads a model written by <see cref="Save"/>; refuses a file without float64 mu [36] / cov [36, 36].</summary>
    public static NiqeModel Load(string path)
    {
        var content = SafeTensors.Load(path);
        try { return FromContent(path, content); }
        finally { foreach (var t in content.Tensors.Values) t.Dispose(); }
    }

    static NiqeModel FromContent(string path, SafeTensorsContent content)
    {
        if (!content.Tensors.TryGetValue("mu", out var mu) || !content.Tensors.TryGetValue("cov", out var cov)
            || !mu.shape.SequenceEqual(new long[] { Features }) || !cov.shape.SequenceEqual(new long[] { Features, Features }))
            throw new CheckpointException(path, "not a NIQE model: expected tensors mu [36] and cov [36, 36]");
        var m = mu.to_type(ScalarType.Float64).data<double>().ToArray();
        var c = cov.to_type(ScalarType.Float64).data<double>().ToArray();
        var c2 = new double[Features, Features];
        for (int i = 0; i < Features; i++) for (int j = 0; j < Features; j++) c2[i, j] = c[i * Features + j];
        var meta = content.Metadata;
        int block = meta.TryGetValue("block_size", out var b) && int.TryParse(b, NumberStyles.Integer, CultureInfo.InvariantCulture, out var bb) && bb >= 8 && bb % 2 == 0
            ? bb : throw new CheckpointException(path, "not a NIQE model: metadata block_size (an even number ≥ 8) is missing");
        int Int(string k) => meta.TryGetValue(k, out var v) && int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var x) ? x : 0;
        return new NiqeModel(m, c2, block, meta.TryGetValue("source", out var s) ? s : "", Int("blocks"), Int("images"));
    }
}

/// <summary>
/// NIQE, the Natural Image Quality Evaluator (Mittal, Soundararajan, Bovik, IEEE SPL 2013), as its MATLAB release and
/// pyiqa compute it: grey levels Y (YIQ luma, × 255, rounded); at two scales (the image, then MATLAB
/// <c>imresize(·, 0.5)</c> bicubic with antialiasing) the MSCN coefficients (img − μ)/(σ + 1) with a 7×7 Gaussian window
/// (σ = 7/6, replicate padding); per non-overlapping block (B × B, then B/2 × B/2) 18 features — an AGGD fit of the
/// coefficients (α, mean β) and of their products with the four neighbours (α, mean, β_l, β_r); the 36-dimensional
/// features of the image's blocks are fitted with a Gaussian, and the score is the distance
/// √((μ₁ − μ₂)ᵀ ((Σ₁ + Σ₂)/2)⁺ (μ₁ − μ₂)) to the pristine model. Lower is better.
/// </summary>
/// <remarks>
/// The pristine model is what makes NIQE a number: the released one was fitted on 125 natural photographs with 96-px
/// blocks. <see cref="Fit"/> fits one on any set of pristine images (MATLAB <c>estimatemodelparam</c>: blocks whose mean
/// σ exceeds 0.75 × the image's sharpest block), which is how <c>niqe-lab</c> gets its model from the project's own HQ
/// images. Blocks without both negative and positive coefficients (flat regions) give NaN features and are left out,
/// as NaN rows are in MATLAB's nanmean / nancov.
/// </remarks>
public static class Niqe
{
    /// <summary>MATLAB estimatemodelparam's sharpness threshold.</summary>
    public const double SharpnessThreshold = 0.75;

    /// <summary>Grey levels as NIQE reads an RGB image in [0, 1]: round(255 · (0.299 R + 0.587 G + 0.114 B)) (pyiqa to_y_channel, yiq). Grey input is taken as Y.</summary>
    public static double[,] GreyLevels(Tensor chw)
    {
        if (chw.dim() != 3 || chw.shape[0] is not (1 or 3))
            throw new ArgumentException($"NIQE: expected one image [C, H, W] with C = 1 or 3, got [{string.Join(", ", chw.shape)}]");
        using var scope = torch.NewDisposeScope();
        var x = chw.to_type(ScalarType.Float64).cpu().contiguous();
        var y = x.shape[0] == 3 ? x[0] * 0.299 + x[1] * 0.587 + x[2] * 0.114 : x[0];
        int h = (int)y.shape[0], w = (int)y.shape[1];
        var d = y.contiguous().data<double>().ToArray();
        var r = new double[h, w];
        for (int i = 0; i < h; i++) for (int j = 0; j < w; j++) r[i, j] = Math.Round(d[i * w + j] * 255.0, MidpointRounding.ToEven);
        return r;
    }

    /// <summary>The NIQE score of grey levels (0…255) against <paramref name="model"/>; NaN when no block has finite features.</summary>
    public static double Score(double[,] grey, NiqeModel model)
    {
        var (feats, _) = BlockFeatures(grey, model.BlockSize);
        var rows = feats.Where(f => f.All(double.IsFinite)).ToList();
        if (rows.Count == 0) return double.NaN;
        var mu = NanMean(feats);
        var cov = Covariance(rows);
        var pooled = new double[NiqeModel.Features * NiqeModel.Features];
        for (int i = 0; i < NiqeModel.Features; i++)
            for (int j = 0; j < NiqeModel.Features; j++)
                pooled[i * NiqeModel.Features + j] = (model.Cov[i, j] + cov[i, j]) / 2;
        using var scope = torch.NewDisposeScope();
        var pinv = torch.linalg.pinv(torch.tensor(pooled, new long[] { NiqeModel.Features, NiqeModel.Features }, ScalarType.Float64));
        var diff = new double[NiqeModel.Features];
        for (int i = 0; i < diff.Length; i++) diff[i] = model.Mu[i] - mu[i];
        var d = torch.tensor(diff, ScalarType.Float64);
        var q = torch.matmul(torch.matmul(d.unsqueeze(0), pinv), d.unsqueeze(1)).item<double>();
        return Math.Sqrt(q);
    }

    /// <summary>
    /// Fits a pristine model (MATLAB estimatemodelparam): each image's blocks at two scales, keeping those whose mean
    /// σ (scale 1) exceeds <paramref name="sharpnessThreshold"/> × the image's largest; mean and covariance (N − 1) of the
    /// kept rows without NaN. Images smaller than one block are refused.
    /// </summary>
    public static NiqeModel Fit(IEnumerable<double[,]> greyImages, int blockSize, string source, double sharpnessThreshold = SharpnessThreshold)
    {
        CheckBlockSize(blockSize);
        var kept = new List<double[]>();
        int images = 0;
        foreach (var g in greyImages)
        {
            images++;
            var (feats, sharp) = BlockFeatures(g, blockSize);
            double max = sharp.Max();
            for (int i = 0; i < feats.Count; i++)
                if (sharp[i] > sharpnessThreshold * max && feats[i].All(double.IsFinite)) kept.Add(feats[i]);
        }
        if (kept.Count <= NiqeModel.Features)
            throw new ArgumentException($"NIQE fit: {kept.Count} usable blocks from {images} image(s); at least {NiqeModel.Features + 1} are needed (more images, larger images or a smaller block size)");
        return new NiqeModel(NanMean(kept), Covariance(kept), blockSize, source, kept.Count, images);
    }

    static void CheckBlockSize(int b)
    {
        if (b < 8 || b % 2 != 0) throw new ArgumentException($"NIQE: the block size must be an even number ≥ 8 (got {b})");
    }

    /// <summary>The 36 features of every B × B block (row-major over blocks, as blkproc) and each block's sharpness (mean σ at scale 1).</summary>
    public static (List<double[]> Features, double[] Sharpness) BlockFeatures(double[,] grey, int blockSize)
    {
        CheckBlockSize(blockSize);
        int h = grey.GetLength(0), w = grey.GetLength(1);
        int nbh = h / blockSize, nbw = w / blockSize;
        if (nbh == 0 || nbw == 0)
            throw new ArgumentException($"NIQE: the image is {h}×{w}; it must be at least one block ({blockSize}×{blockSize})");
        var img = new double[nbh * blockSize, nbw * blockSize];
        for (int i = 0; i < img.GetLength(0); i++) for (int j = 0; j < img.GetLength(1); j++) img[i, j] = grey[i, j];
        var feats = new List<double[]>();
        for (int k = 0; k < nbh * nbw; k++) feats.Add(new double[NiqeModel.Features]);
        var sharp = new double[nbh * nbw];
        for (int scale = 1; scale <= 2; scale++)
        {
            var (mscn, sigma) = Mscn(img);
            int bs = blockSize / scale;
            for (int bi = 0; bi < nbh; bi++)
                for (int bj = 0; bj < nbw; bj++)
                {
                    int k = bi * nbw + bj;
                    var block = new double[bs, bs];
                    double sum = 0;
                    for (int i = 0; i < bs; i++)
                        for (int j = 0; j < bs; j++)
                        {
                            block[i, j] = mscn[bi * bs + i, bj * bs + j];
                            sum += sigma[bi * bs + i, bj * bs + j];
                        }
                    if (scale == 1) sharp[k] = sum / (bs * bs);
                    BlockFeature(block).CopyTo(feats[k], (scale - 1) * 18);
                }
            if (scale == 1) img = MatlabResize.HalfBicubic(img);
        }
        return (feats, sharp);
    }

    /// <summary>The 7×7 Gaussian window of σ = 7/6 (MATLAB fspecial, normalised to sum 1).</summary>
    internal static double[,] Window()
    {
        var k = new double[7, 7];
        double s = 7.0 / 6.0, total = 0;
        for (int i = 0; i < 7; i++)
            for (int j = 0; j < 7; j++) { k[i, j] = Math.Exp(-((i - 3) * (i - 3) + (j - 3) * (j - 3)) / (2 * s * s)); total += k[i, j]; }
        for (int i = 0; i < 7; i++) for (int j = 0; j < 7; j++) k[i, j] /= total;
        return k;
    }

    /// <summary>MSCN coefficients (img − μ)/(σ + 1) and σ = √|G∗img² − μ²|, μ = G∗img, replicate padding.</summary>
    public static (double[,] Mscn, double[,] Sigma) Mscn(double[,] img)
    {
        int h = img.GetLength(0), w = img.GetLength(1);
        var k = Window();
        var mscn = new double[h, w];
        var sig = new double[h, w];
        for (int i = 0; i < h; i++)
            for (int j = 0; j < w; j++)
            {
                double mu = 0, mu2 = 0;
                for (int a = 0; a < 7; a++)
                {
                    int ii = Math.Clamp(i + a - 3, 0, h - 1);
                    for (int b = 0; b < 7; b++)
                    {
                        double v = img[ii, Math.Clamp(j + b - 3, 0, w - 1)];
                        mu += k[a, b] * v;
                        mu2 += k[a, b] * v * v;
                    }
                }
                double s = Math.Sqrt(Math.Abs(mu2 - mu * mu));
                sig[i, j] = s;
                mscn[i, j] = (img[i, j] - mu) / (s + 1);
            }
        return (mscn, sig);
    }

    static readonly int[][] Shifts = { new[] { 0, 1 }, new[] { 1, 0 }, new[] { 1, 1 }, new[] { 1, -1 } };

    /// <summary>18 features of one block (basicsr / pyiqa compute_feature): AGGD of the block (α, (β_l + β_r)/2), then of its products with the block rolled by (0,1), (1,0), (1,1), (1,−1) (α, mean, β_l, β_r).</summary>
    public static double[] BlockFeature(double[,] block)
    {
        int h = block.GetLength(0), w = block.GetLength(1);
        var f = new double[18];
        var flat = new double[h * w];
        for (int i = 0; i < h; i++) for (int j = 0; j < w; j++) flat[i * w + j] = block[i, j];
        var (a0, l0, r0) = Aggd.Fit(flat);
        f[0] = a0; f[1] = (l0 + r0) / 2;
        for (int s = 0; s < 4; s++)
        {
            int di = Shifts[s][0], dj = Shifts[s][1];
            var prod = new double[h * w];
            for (int i = 0; i < h; i++)
                for (int j = 0; j < w; j++)
                {
                    // np.roll / torch.roll: shifted[i, j] = block[i − di, j − dj] (circular)
                    int si = ((i - di) % h + h) % h, sj = ((j - dj) % w + w) % w;
                    prod[i * w + j] = block[i, j] * block[si, sj];
                }
            var (a, l, r) = Aggd.Fit(prod);
            double mean = (r - l) * Math.Exp(Aggd.LogGamma(2 / a) - Aggd.LogGamma(1 / a));
            f[2 + 4 * s] = a; f[3 + 4 * s] = mean; f[4 + 4 * s] = l; f[5 + 4 * s] = r;
        }
        return f;
    }

    static double[] NanMean(IReadOnlyList<double[]> rows)
    {
        var m = new double[NiqeModel.Features];
        for (int c = 0; c < m.Length; c++)
        {
            double s = 0; int n = 0;
            foreach (var r in rows) if (double.IsFinite(r[c])) { s += r[c]; n++; }
            m[c] = n == 0 ? double.NaN : s / n;
        }
        return m;
    }

    /// <summary>Sample covariance (N − 1; np.cov rowvar=False) of rows without NaN; a single row gives zeros.</summary>
    static double[,] Covariance(IReadOnlyList<double[]> rows)
    {
        int d = NiqeModel.Features, n = rows.Count;
        var mean = NanMean(rows);
        var c = new double[d, d];
        if (n < 2) return c;
        for (int i = 0; i < d; i++)
            for (int j = i; j < d; j++)
            {
                double s = 0;
                foreach (var r in rows) s += (r[i] - mean[i]) * (r[j] - mean[j]);
                c[i, j] = c[j, i] = s / (n - 1);
            }
        return c;
    }
}

/// <summary>Asymmetric generalised Gaussian fit by moment matching (Lasmar et al. 2009; basicsr estimate_aggd_param).</summary>
public static class Aggd
{
    // declared first: the static initialisers below use it
    static readonly double[] Lanczos =
    {
        0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059,
        12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7,
    };

    static readonly double[] Gam = Enumerable.Range(0, 9801).Select(k => 0.2 + 0.001 * k).ToArray();
    static readonly double[] RGam = Gam.Select(g => Math.Exp(2 * LogGamma(2 / g) - LogGamma(1 / g) - LogGamma(3 / g))).ToArray();

    /// <summary>(α, β_l, β_r) of the samples; NaN when there are no negative or no positive samples.</summary>
    public static (double Alpha, double BetaL, double BetaR) Fit(ReadOnlySpan<double> x)
    {
        double sl = 0, sr = 0, sabs = 0, ssq = 0; int nl = 0, nr = 0;
        foreach (var v in x)
        {
            if (v < 0) { sl += v * v; nl++; }
            else if (v > 0) { sr += v * v; nr++; }
            sabs += Math.Abs(v); ssq += v * v;
        }
        if (nl == 0 || nr == 0) return (double.NaN, double.NaN, double.NaN);
        double left = Math.Sqrt(sl / nl), right = Math.Sqrt(sr / nr);
        double gh = left / right;
        double rhat = (sabs / x.Length) * (sabs / x.Length) / (ssq / x.Length);
        double rn = rhat * (gh * gh * gh + 1) * (gh + 1) / ((gh * gh + 1) * (gh * gh + 1));
        int best = 0; double bestD = double.PositiveInfinity;
        for (int k = 0; k < RGam.Length; k++)
        {
            double d = (RGam[k] - rn) * (RGam[k] - rn);
            if (d < bestD) { bestD = d; best = k; }
        }
        double alpha = Gam[best];
        double f = Math.Sqrt(Math.Exp(LogGamma(1 / alpha) - LogGamma(3 / alpha)));
        return (alpha, left * f, right * f);
    }


    /// <summary>ln Γ(x) for x &gt; 0 (Lanczos, g = 7; relative error ~1e-15).</summary>
    public static double LogGamma(double x)
    {
        if (x < 0.5) return Math.Log(Math.PI / Math.Abs(Math.Sin(Math.PI * x))) - LogGamma(1 - x);
        x -= 1;
        double a = Lanczos[0];
        double t = x + 7.5;
        for (int i = 1; i < 9; i++) a += Lanczos[i] / (x + i);
        return 0.5 * Math.Log(2 * Math.PI) + (x + 0.5) * Math.Log(t) - t + Math.Log(a);
    }
}

/// <summary>MATLAB <c>imresize(img, 0.5)</c>: bicubic (a = −0.5) with antialiasing (kernel widened ×2), symmetric borders.</summary>
public static class MatlabResize
{
    static double Cubic(double x)
    {
        double a = Math.Abs(x), a2 = a * a, a3 = a2 * a;
        if (a <= 1) return 1.5 * a3 - 2.5 * a2 + 1;
        if (a <= 2) return -0.5 * a3 + 2.5 * a2 - 4 * a + 2;
        return 0;
    }

    /// <summary>Weights and 0-based source indices of each output sample along one axis (basicsr calculate_weights_indices, scale 0.5).</summary>
    public static (double[][] Weights, int[][] Indices) HalfWeights(int inLength)
    {
        const double scale = 0.5;
        int outLength = (int)Math.Ceiling(inLength * scale);
        double width = 4 / scale;
        int p = (int)Math.Ceiling(width) + 2;
        var ws = new double[outLength][];
        var ix = new int[outLength][];
        for (int o = 0; o < outLength; o++)
        {
            double u = (o + 1) / scale + 0.5 * (1 - 1 / scale);
            double left = Math.Floor(u - width / 2);
            var wt = new double[p]; var id = new int[p];
            double sum = 0;
            for (int k = 0; k < p; k++)
            {
                double j = left + k; // 1-based
                wt[k] = scale * Cubic((u - j) * scale);
                sum += wt[k];
                int jj = (int)j;
                if (jj < 1) jj = 1 - jj;                          // symmetric: 0 → 1, −1 → 2
                else if (jj > inLength) jj = 2 * inLength + 1 - jj; // L + 1 → L
                id[k] = jj - 1;
            }
            for (int k = 0; k < p; k++) wt[k] /= sum;
            ws[o] = wt; ix[o] = id;
        }
        return (ws, ix);
    }

    /// <summary>Halves both sides (rows first, then columns, as basicsr's imresize: height dimension first).</summary>
    public static double[,] HalfBicubic(double[,] img)
    {
        int h = img.GetLength(0), w = img.GetLength(1);
        var (wh, ih) = HalfWeights(h);
        var (ww, iw) = HalfWeights(w);
        var tmp = new double[wh.Length, w];
        for (int o = 0; o < wh.Length; o++)
            for (int j = 0; j < w; j++)
            {
                double s = 0;
                for (int k = 0; k < wh[o].Length; k++) s += wh[o][k] * img[ih[o][k], j];
                tmp[o, j] = s;
            }
        var r = new double[wh.Length, ww.Length];
        for (int i = 0; i < wh.Length; i++)
            for (int o = 0; o < ww.Length; o++)
            {
                double s = 0;
                for (int k = 0; k < ww[o].Length; k++) s += ww[o][k] * tmp[i, iw[o][k]];
                r[i, o] = s;
            }
        return r;
    }
}

/// <summary>
/// The lab's weight-free quality measure (<c>niqe-lab</c>): NIQE with a pristine model fitted on the project's own HQ
/// images, 32-px blocks (small enough for the 64–128 px images of the tiny preset; the released NIQE uses 96).
/// </summary>
public static class NiqeLab
{
    /// <summary>The committed model, relative to the weights folder.</summary>
    public const string ModelFile = "niqe_lab.safetensors";
    public const int BlockSize = 32;

    /// <summary><paramref name="weightsDir"/>/niqe_lab.safetensors, else the repository's weights/ copy (found like weights/manifest.json); null when neither exists.</summary>
    public static string? FindModel(string weightsDir = "weights")
    {
        var p = Path.Combine(weightsDir, ModelFile);
        if (File.Exists(p)) return p;
        try
        {
            var repo = Path.Combine(Path.GetDirectoryName(Pipeline.Presets.FindManifest())!, ModelFile);
            return File.Exists(repo) ? repo : null;
        }
        catch (FileNotFoundException) { return null; }
    }

    /// <summary>Fits the model on RGB or grey images (each [C, H, W] or [1, C, H, W], float in [0, 1]).</summary>
    public static NiqeModel Fit(IEnumerable<Tensor> images, string source, int blockSize = BlockSize) =>
        Niqe.Fit(images.Select(t => Niqe.GreyLevels(t.dim() == 4 ? t[0] : t)), blockSize, source);
}
