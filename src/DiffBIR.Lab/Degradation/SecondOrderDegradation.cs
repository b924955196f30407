using System.Text.Json.Nodes;
using DiffBIR.Lab.Training;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Degradation;

/// <summary>
/// Parameters of the official <c>RealESRGANBatchTransform</c> (configs/train/train_stage2_v2.1.yaml
/// <c>batch_transform.params</c>; names in brackets).
/// </summary>
public sealed record RealEsrganBatchTransformConfig
{
    public bool UseSharpener { get; init; } = true;                 // use_sharpener
    public int QueueSize { get; init; } = 256;                      // queue_size
    public double[] ResizeProb { get; init; } = { 0.2, 0.7, 0.1 };  // resize_prob: up, down, keep
    public double[] ResizeRange { get; init; } = { 0.15, 1.5 };     // resize_range
    public double GaussianNoiseProb { get; init; } = 0.5;           // gaussian_noise_prob
    public double[] NoiseRange { get; init; } = { 1, 30 };          // noise_range
    public double[] PoissonScaleRange { get; init; } = { 0.05, 3 }; // poisson_scale_range
    public double GrayNoiseProb { get; init; } = 0.4;               // gray_noise_prob
    public double[] JpegRange { get; init; } = { 30, 95 };          // jpeg_range
    public double Stage2Scale { get; init; } = 4;                   // stage2_scale (a number)
    public double[]? Stage2ScaleRange { get; init; }                // stage2_scale as [min, max]
    public double SecondBlurProb { get; init; } = 0.8;              // second_blur_prob
    public double[] ResizeProb2 { get; init; } = { 0.3, 0.4, 0.3 }; // resize_prob2
    public double[] ResizeRange2 { get; init; } = { 0.3, 1.2 };     // resize_range2
    public double GaussianNoiseProb2 { get; init; } = 0.5;          // gaussian_noise_prob2
    public double[] NoiseRange2 { get; init; } = { 1, 25 };         // noise_range2
    public double[] PoissonScaleRange2 { get; init; } = { 0.05, 2.5 }; // poisson_scale_range2
    public double GrayNoiseProb2 { get; init; } = 0.4;              // gray_noise_prob2
    public double[] JpegRange2 { get; init; } = { 30, 95 };         // jpeg_range2

    /// <summary>The official v2.1 settings.</summary>
    public static RealEsrganBatchTransformConfig V2_1 { get; } = new();

    public static RealEsrganBatchTransformConfig FromJson(JsonNode n)
    {
        double[] A(string k) => n[k]!.AsArray().Select(x => (double)x!).ToArray();
        double D(string k) => (double)n[k]!;
        var s2 = n["stage2_scale"]!;
        return new RealEsrganBatchTransformConfig
        {
            UseSharpener = (bool)n["use_sharpener"]!, QueueSize = (int)n["queue_size"]!,
            ResizeProb = A("resize_prob"), ResizeRange = A("resize_range"), GaussianNoiseProb = D("gaussian_noise_prob"),
            NoiseRange = A("noise_range"), PoissonScaleRange = A("poisson_scale_range"), GrayNoiseProb = D("gray_noise_prob"),
            JpegRange = A("jpeg_range"),
            Stage2Scale = s2 is JsonArray ? 0 : (double)s2, Stage2ScaleRange = s2 is JsonArray a ? a.Select(x => (double)x!).ToArray() : null,
            SecondBlurProb = D("second_blur_prob"), ResizeProb2 = A("resize_prob2"), ResizeRange2 = A("resize_range2"),
            GaussianNoiseProb2 = D("gaussian_noise_prob2"), NoiseRange2 = A("noise_range2"),
            PoissonScaleRange2 = A("poisson_scale_range2"), GrayNoiseProb2 = D("gray_noise_prob2"), JpegRange2 = A("jpeg_range2"),
        };
    }
}

/// <summary>
/// The Real-ESRGAN second-order degradation that DiffBIR v2.1 applies to each training batch on the device (official
/// <c>diffbir.dataset.batch_transform.RealESRGANBatchTransform.__call__</c>): USM sharpening of the target, then twice
/// blur → random resize → Gaussian or Poisson noise → DiffJPEG, the second round ending with the sinc filter before or
/// after its JPEG, and a bicubic resize back. Python/numpy decisions come from an <see cref="IDegradationRandom"/>
/// (uniforms: <c>np.random.uniform</c>; choices: <c>random.choices</c> / <c>random.choice</c>), torch draws from an
/// <see cref="ITrainingDraws"/>, each in the official call order. The training-pair pool (queue) is not part of this
/// function: on its first <c>queue_size / B</c> calls the official pool only enqueues, so the batch passes through.
/// </summary>
public static class RealEsrganBatchTransform
{
    static readonly string[] UpDown = { "up", "down", "keep" };
    static readonly string[] Modes = { "area", "bilinear", "bicubic" };

    /// <summary>
    /// hq [B, 3, H, W] in [0, 1]; kernel1, kernel2, sinc [B or 1, k, k] (odd k). Returns (hq NHWC in [-1, 1], lq NHWC
    /// in [0, 1] quantised to 1/255). <paramref name="record"/> receives every intermediate, named as the fixture.
    /// </summary>
    public static (Tensor HqNhwc, Tensor LqNhwc) Apply(RealEsrganBatchTransformConfig c, Tensor hq, Tensor kernel1, Tensor kernel2,
        Tensor sinc, IDegradationRandom rng, ITrainingDraws draws, Action<string, Tensor>? record = null)
    {
        if (hq.dim() != 4 || hq.shape[1] != 3) throw new ArgumentException($"hq must be [B, 3, H, W], got [{string.Join(",", hq.shape)}]", nameof(hq));
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        int step = 0;
        Tensor Rec(string op, Tensor t) { record?.Invoke($"{step++:00}_{op}", t); return t; }

        if (c.UseSharpener) hq = Rec("usm_sharp", UsmSharp(hq));
        long oriH = hq.shape[2], oriW = hq.shape[3];

        // ---- first degradation ----
        var out_ = Rec("filter2D", Filter2D(hq, kernel1));
        double scale = UpDown[rng.Choose(c.ResizeProb)] switch
        {
            "up" => rng.Uniform(1, c.ResizeRange[1]),
            "down" => rng.Uniform(c.ResizeRange[0], 1),
            _ => 1,
        };
        var mode = Modes[rng.Choose(new double[] { 1, 1, 1 })];
        out_ = Rec("interpolate", InterpolateScale(out_, scale, mode));
        out_ = rng.Uniform(0, 1) < c.GaussianNoiseProb
            ? Rec("gaussian_noise", RandomAddGaussianNoise(out_, c.NoiseRange, c.GrayNoiseProb, draws))
            : Rec("poisson_noise", RandomAddPoissonNoise(out_, c.PoissonScaleRange, c.GrayNoiseProb, draws));
        var q = draws.Uniform(new[] { out_.shape[0] }, c.JpegRange[0], c.JpegRange[1], out_.dtype, out_.device, "jpeg quality");
        out_ = Rec("jpeg", DiffJpeg.Apply(out_.clamp(0, 1), q));

        // ---- second degradation ----
        if (rng.Uniform(0, 1) < c.SecondBlurProb) out_ = Rec("filter2D", Filter2D(out_, kernel2));
        double s2 = c.Stage2ScaleRange is { } r ? rng.Uniform(r[0], r[1]) : c.Stage2Scale;
        long h2 = (long)(oriH / s2), w2 = (long)(oriW / s2);
        scale = UpDown[rng.Choose(c.ResizeProb2)] switch
        {
            "up" => rng.Uniform(1, c.ResizeRange2[1]),
            "down" => rng.Uniform(c.ResizeRange2[0], 1),
            _ => 1,
        };
        mode = Modes[rng.Choose(new double[] { 1, 1, 1 })];
        out_ = Rec("interpolate", InterpolateSize(out_, (long)(h2 * scale), (long)(w2 * scale), mode));
        out_ = rng.Uniform(0, 1) < c.GaussianNoiseProb2
            ? Rec("gaussian_noise", RandomAddGaussianNoise(out_, c.NoiseRange2, c.GrayNoiseProb2, draws))
            : Rec("poisson_noise", RandomAddPoissonNoise(out_, c.PoissonScaleRange2, c.GrayNoiseProb2, draws));
        if (rng.Uniform(0, 1) < 0.5)
        {
            mode = Modes[rng.Choose(new double[] { 1, 1, 1 })];
            out_ = Rec("interpolate", InterpolateSize(out_, h2, w2, mode));
            out_ = Rec("filter2D", Filter2D(out_, sinc));
            q = draws.Uniform(new[] { out_.shape[0] }, c.JpegRange2[0], c.JpegRange2[1], out_.dtype, out_.device, "jpeg quality 2");
            out_ = Rec("jpeg", DiffJpeg.Apply(out_.clamp(0, 1), q));
        }
        else
        {
            q = draws.Uniform(new[] { out_.shape[0] }, c.JpegRange2[0], c.JpegRange2[1], out_.dtype, out_.device, "jpeg quality 2");
            out_ = Rec("jpeg", DiffJpeg.Apply(out_.clamp(0, 1), q));
            mode = Modes[rng.Choose(new double[] { 1, 1, 1 })];
            out_ = Rec("interpolate", InterpolateSize(out_, h2, w2, mode));
            out_ = Rec("filter2D", Filter2D(out_, sinc));
        }
        if (s2 != 1) out_ = Rec("interpolate", InterpolateSize(out_, oriH, oriW, "bicubic"));
        var lq = (out_ * 255.0).round().clamp(0, 255) / 255.0;
        var lqNhwc = lq.to(ScalarType.Float32).permute(0, 2, 3, 1).contiguous();
        var hqNhwc = (hq * 2 - 1).to(ScalarType.Float32).permute(0, 2, 3, 1).contiguous();
        return (hqNhwc.MoveToOuterDisposeScope(), lqNhwc.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Official <c>filter2D</c> (a PyTorch cv2.filter2D): reflect padding by k/2, then correlation with one kernel for
    /// the whole batch ([1, k, k]) or one per sample ([B, k, k]) applied to every channel.
    /// </summary>
    public static Tensor Filter2D(Tensor img, Tensor kernel)
    {
        long k = kernel.shape[^1];
        if (k % 2 != 1) throw new ArgumentException("Wrong kernel size");
        long b = img.shape[0], c = img.shape[1], h = img.shape[2], w = img.shape[3];
        using var scope = NewDisposeScope();
        var p = F.pad(img, new[] { k / 2, k / 2, k / 2, k / 2 }, PaddingModes.Reflect);
        long ph = p.shape[2], pw = p.shape[3];
        Tensor y;
        if (kernel.shape[0] == 1)
            y = F.conv2d(p.view(b * c, 1, ph, pw), kernel.view(1, 1, k, k)).view(b, c, h, w);
        else
            y = F.conv2d(p.view(1, b * c, ph, pw), kernel.view(b, 1, k, k).repeat(1, c, 1, 1).view(b * c, 1, k, k), groups: b * c).view(b, c, h, w);
        return y.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The USM kernel: <c>cv2.getGaussianKernel(51, 0)</c> (σ = 0.3·((51 − 1)/2 − 1) + 0.8 = 8), its outer product in
    /// float64, stored as float32 [1, 51, 51].
    /// </summary>
    public static Tensor UsmKernel(int radius = 50)
    {
        if (radius % 2 == 0) radius += 1;
        double sigma = 0.3 * ((radius - 1) * 0.5 - 1) + 0.8;
        var g = new double[radius];
        double sum = 0, scale2X = -0.5 / (sigma * sigma);
        for (int i = 0; i < radius; i++) { double x = i - (radius - 1) * 0.5; g[i] = Math.Exp(scale2X * x * x); sum += g[i]; }
        sum = 1.0 / sum;
        for (int i = 0; i < radius; i++) g[i] *= sum;
        var k2 = new double[radius * radius];
        for (int i = 0; i < radius; i++) for (int j = 0; j < radius; j++) k2[i * radius + j] = g[i] * g[j];
        return tensor(k2, new long[] { 1, radius, radius }, ScalarType.Float64).to(ScalarType.Float32);
    }

    /// <summary>Official <c>USMSharp(radius=50, sigma=0)(img, weight=0.5, threshold=10)</c>.</summary>
    public static Tensor UsmSharp(Tensor img, double weight = 0.5, double threshold = 10)
    {
        using var scope = NewDisposeScope();
        var kernel = UsmKernel().to(img.device);
        var blur = Filter2D(img, kernel);
        var residual = img - blur;
        var mask = (residual.abs() * 255).gt(threshold).to(ScalarType.Float32);
        var softMask = Filter2D(mask, kernel);
        var sharp = (img + weight * residual).clip(0, 1);
        return (softMask * sharp + (1 - softMask) * img).MoveToOuterDisposeScope();
    }

    static InterpolationMode ModeOf(string mode) => mode switch
    {
        "area" => InterpolationMode.Area,
        "bilinear" => InterpolationMode.Bilinear,
        "bicubic" => InterpolationMode.Bicubic,
        _ => throw new ArgumentException($"interpolation mode '{mode}'"),
    };

    /// <summary><c>F.interpolate(x, scale_factor=s, mode=mode)</c> (align_corners False, the scale passed on as torch does).</summary>
    public static Tensor InterpolateScale(Tensor x, double scale, string mode) =>
        F.interpolate(x, scale_factor: new[] { scale, scale }, mode: ModeOf(mode),
            align_corners: mode == "area" ? null : false);

    /// <summary><c>F.interpolate(x, size=(h, w), mode=mode)</c>.</summary>
    public static Tensor InterpolateSize(Tensor x, long h, long w, string mode) =>
        F.interpolate(x, size: new[] { h, w }, mode: ModeOf(mode), align_corners: mode == "area" ? null : false);

    /// <summary>torchvision <c>rgb_to_grayscale</c>: 0.2989 R + 0.587 G + 0.114 B, [B, 1, H, W].</summary>
    static Tensor Gray(Tensor img) =>
        (0.2989 * img[.., 0] + 0.587 * img[.., 1] + 0.114 * img[.., 2]).unsqueeze(1);

    /// <summary>Official <c>random_add_gaussian_noise_pt(img, sigma_range, clip=True, rounds=False, gray_prob)</c>.</summary>
    public static Tensor RandomAddGaussianNoise(Tensor img, double[] sigmaRange, double grayProb, ITrainingDraws draws)
    {
        using var scope = NewDisposeScope();
        long b = img.shape[0], h = img.shape[2], w = img.shape[3];
        var sigma = draws.Rand(new[] { b }, img.dtype, img.device, "gaussian sigma") * (sigmaRange[1] - sigmaRange[0]) + sigmaRange[0];
        var gray = draws.Rand(new[] { b }, img.dtype, img.device, "gray noise").lt(grayProb).to(ScalarType.Float32);
        sigma = sigma.view(b, 1, 1, 1);
        gray = gray.view(b, 1, 1, 1);
        bool calGray = gray.sum().item<float>() > 0;
        Tensor? noiseGray = null;
        if (calGray) noiseGray = (draws.Randn(new[] { h, w }, img.dtype, img.device, "gray gaussian noise") * sigma / 255.0).view(b, 1, h, w);
        var noise = draws.Randn(img.shape, img.dtype, img.device, "gaussian noise") * sigma / 255.0;
        if (calGray) noise = noise * (1 - gray) + noiseGray! * gray;
        return (img + noise).clamp(0, 1).MoveToOuterDisposeScope();
    }

    static Tensor PoissonVals(Tensor img)
    {
        long b = img.shape[0];
        var vals = new float[b];
        for (int i = 0; i < b; i++)
        {
            using var u = img[i].flatten().unique().Item1;
            vals[i] = (float)Math.Pow(2, Math.Ceiling(Math.Log2(u.shape[0])));
        }
        return tensor(vals, img.dtype, img.device).view(b, 1, 1, 1);
    }

    /// <summary>Official <c>random_add_poisson_noise_pt(img, scale_range, gray_prob, clip=True, rounds=False)</c>.</summary>
    public static Tensor RandomAddPoissonNoise(Tensor img, double[] scaleRange, double grayProb, ITrainingDraws draws)
    {
        using var scope = NewDisposeScope();
        long b = img.shape[0], h = img.shape[2], w = img.shape[3];
        var scale = draws.Rand(new[] { b }, img.dtype, img.device, "poisson scale") * (scaleRange[1] - scaleRange[0]) + scaleRange[0];
        var gray = draws.Rand(new[] { b }, img.dtype, img.device, "gray noise").lt(grayProb).to(ScalarType.Float32).view(b, 1, 1, 1);
        bool calGray = gray.sum().item<float>() > 0;
        Tensor? noiseGray = null;
        if (calGray)
        {
            var g = (Gray(img) * 255.0).round().clamp(0, 255) / 255.0;
            var gv = PoissonVals(g);
            var gout = draws.Poisson(g * gv, "gray poisson") / gv;
            noiseGray = (gout - g).expand(b, 3, h, w);
        }
        var r = (img * 255.0).round().clamp(0, 255) / 255.0;
        var vals = PoissonVals(r);
        var o = draws.Poisson(r * vals, "poisson") / vals;
        var noise = o - r;
        if (calGray) noise = noise * (1 - gray) + noiseGray! * gray;
        noise = noise * scale.view(b, 1, 1, 1);
        return (img + noise).clamp(0, 1).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The official <c>DiffJPEG(differentiable=False)</c> (diffbir/dataset/diffjpeg.py, after mlomnitz/DiffJPEG): RGB →
/// YCbCr (JPEG matrix), 2×2 average chroma subsampling, 8×8 blocks, DCT as a tensordot, quantisation by the standard
/// tables × factor(quality) with <c>torch.round</c>, and back; the image is zero-padded to multiples of 16 first.
/// </summary>
public static class DiffJpeg
{
    static readonly float[,] YTableRows =
    {
        { 16, 11, 10, 16, 24, 40, 51, 61 }, { 12, 12, 14, 19, 26, 58, 60, 55 }, { 14, 13, 16, 24, 40, 57, 69, 56 },
        { 14, 17, 22, 29, 51, 87, 80, 62 }, { 18, 22, 37, 56, 68, 109, 103, 77 }, { 24, 35, 55, 64, 81, 104, 113, 92 },
        { 49, 64, 78, 87, 103, 121, 120, 101 }, { 72, 92, 95, 98, 112, 100, 103, 99 },
    };
    static readonly float[,] CTopLeftRows = { { 17, 18, 24, 47 }, { 18, 21, 26, 66 }, { 24, 26, 56, 99 }, { 47, 66, 99, 99 } };

    /// <summary>The Y table as the official code stores it (the rows above, transposed).</summary>
    public static Tensor YTable()
    {
        var t = new float[64];
        for (int i = 0; i < 8; i++) for (int j = 0; j < 8; j++) t[i * 8 + j] = YTableRows[j, i];
        return tensor(t, new long[] { 8, 8 });
    }

    /// <summary>The CbCr table: 99 everywhere, the transposed 4×4 block top left.</summary>
    public static Tensor CTable()
    {
        var t = Enumerable.Repeat(99f, 64).ToArray();
        for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) t[i * 8 + j] = CTopLeftRows[j, i];
        return tensor(t, new long[] { 8, 8 });
    }

    /// <summary>Official <c>quality_to_factor</c>, in float64 from the float32 quality, stored back as float32.</summary>
    public static float QualityToFactor(float quality)
    {
        double q = quality;
        q = q < 50 ? 5000.0 / q : 200.0 - q * 2;
        return (float)(q / 100.0);
    }

    static Tensor DctTensor(bool inverse)
    {
        var t = new float[8 * 8 * 8 * 8];
        int n = 0;
        for (int x = 0; x < 8; x++) for (int y = 0; y < 8; y++) for (int u = 0; u < 8; u++) for (int v = 0; v < 8; v++)
            t[n++] = inverse
                ? (float)(Math.Cos((2 * u + 1) * x * Math.PI / 16) * Math.Cos((2 * v + 1) * y * Math.PI / 16))
                : (float)(Math.Cos((2 * x + 1) * u * Math.PI / 16) * Math.Cos((2 * y + 1) * v * Math.PI / 16));
        return tensor(t, new long[] { 8, 8, 8, 8 });
    }

    static Tensor AlphaOuter(double factor)
    {
        var a = new double[8];
        a[0] = 1.0 / Math.Sqrt(2);
        for (int i = 1; i < 8; i++) a[i] = 1;
        var o = new float[64];
        for (int i = 0; i < 8; i++) for (int j = 0; j < 8; j++) o[i * 8 + j] = (float)(a[i] * a[j] * factor);
        return tensor(o, new long[] { 8, 8 });
    }

    /// <summary><c>torch.tensordot(a, b, dims=n)</c>: the last n dims of a with the first n of b, as one matrix product.</summary>
    static Tensor TensorDot(Tensor a, Tensor b, int n)
    {
        var outer = a.shape[..^n];
        long inner = a.shape[^n..].Aggregate(1L, (x, y) => x * y);
        var rest = b.shape[n..];
        var r = a.reshape(-1, inner).mm(b.reshape(inner, -1));
        return r.view(outer.Concat(rest).ToArray());
    }

    /// <summary>x [B, 3, H, W] in [0, 1], quality [B] (float32) → the decoded image [B, 3, H, W] in [0, 1].</summary>
    public static Tensor Apply(Tensor x, Tensor quality)
    {
        using var scope = NewDisposeScope();
        var dev = x.device;
        long b = x.shape[0];
        var factor = tensor(quality.cpu().to(ScalarType.Float32).data<float>().Select(QualityToFactor).ToArray(), ScalarType.Float32, dev);
        long h = x.shape[2], w = x.shape[3];
        long hPad = h % 16 != 0 ? 16 - h % 16 : 0, wPad = w % 16 != 0 ? 16 - w % 16 : 0;
        x = F.pad(x, new[] { 0, wPad, 0, hPad }, PaddingModes.Constant, 0);
        long H = h + hPad, W = w + wPad;

        var yTable = YTable().to(dev); var cTable = CTable().to(dev);
        var dct = DctTensor(false).to(dev); var idct = DctTensor(true).to(dev);
        var dctScale = AlphaOuter(0.25).to(dev); var idctAlpha = AlphaOuter(1).to(dev);

        // compress: RGB → YCbCr
        var toYcc = tensor(new float[] { 0.299f, 0.587f, 0.114f, -0.168736f, -0.331264f, 0.5f, 0.5f, -0.418688f, -0.081312f }, new long[] { 3, 3 }, device: dev).t();
        var image = (x * 255).permute(0, 2, 3, 1);
        var ycc = TensorDot(image, toYcc, 1) + tensor(new float[] { 0, 128, 128 }, device: dev);
        ycc = ycc.view(image.shape);
        var ycc2 = ycc.permute(0, 3, 1, 2).clone();
        var cb = F.avg_pool2d(ycc2[.., 1].unsqueeze(1), 2, 2, count_include_pad: false).permute(0, 2, 3, 1).squeeze(3);
        var cr = F.avg_pool2d(ycc2[.., 2].unsqueeze(1), 2, 2, count_include_pad: false).permute(0, 2, 3, 1).squeeze(3);
        var yC = ycc[.., .., .., 0];

        Tensor Split(Tensor img)
        {
            long hh = img.shape[1];
            return img.view(img.shape[0], hh / 8, 8, -1, 8).permute(0, 1, 3, 2, 4).contiguous().view(img.shape[0], -1, 8, 8);
        }
        Tensor Dct(Tensor img) => dctScale * TensorDot(img - 128, dct, 2);
        Tensor Table(Tensor t) => t.expand(b, 1, 8, 8) * factor.view(b, 1, 1, 1);
        Tensor Idct(Tensor img) => 0.25 * TensorDot(img * idctAlpha, idct, 2) + 128;
        Tensor Merge(Tensor patches, long hh, long ww) =>
            patches.view(patches.shape[0], hh / 8, ww / 8, 8, 8).permute(0, 1, 3, 2, 4).contiguous().view(patches.shape[0], hh, ww);
        Tensor Repeat2(Tensor t)
        {
            long hh = t.shape[1], ww = t.shape[2];
            return t.unsqueeze(-1).repeat(1, 1, 2, 2).view(-1, hh * 2, ww * 2);
        }

        var yq = (Dct(Split(yC)).to(ScalarType.Float32) / Table(yTable)).round();
        var cbq = (Dct(Split(cb)).to(ScalarType.Float32) / Table(cTable)).round();
        var crq = (Dct(Split(cr)).to(ScalarType.Float32) / Table(cTable)).round();

        // decompress
        var yd = Merge(Idct(yq * Table(yTable)), H, W);
        var cbd = Merge(Idct(cbq * Table(cTable)), (long)(H / 2.0), (long)(W / 2.0));
        var crd = Merge(Idct(crq * Table(cTable)), (long)(H / 2.0), (long)(W / 2.0));
        var merged = cat(new[] { yd.unsqueeze(3), Repeat2(cbd).unsqueeze(3), Repeat2(crd).unsqueeze(3) }, 3);
        var toRgb = tensor(new float[] { 1f, 0f, 1.402f, 1f, -0.344136f, -0.714136f, 1f, 1.772f, 0f }, new long[] { 3, 3 }, device: dev).t();
        var rgb = TensorDot(merged + tensor(new float[] { 0, -128, -128 }, device: dev), toRgb, 1).view(merged.shape).permute(0, 3, 1, 2);
        rgb = minimum(255 * ones_like(rgb), maximum(zeros_like(rgb), rgb));
        var result = (rgb / 255)[.., .., ..(int)h, ..(int)w].contiguous();
        return result.MoveToOuterDisposeScope();
    }
}
