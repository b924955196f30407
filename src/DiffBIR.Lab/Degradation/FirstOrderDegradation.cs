using System.Numerics;
using System.Runtime.InteropServices;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Jpeg;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Degradation;

/// <summary>What one call of <see cref="FirstOrderDegradation.Degrade"/> drew.</summary>
/// <param name="Blur">kernel type, σx, σy, θ and the float64 kernel</param>
/// <param name="Scale">the downsampling factor r drawn from the range</param>
/// <param name="SmallHeight">⌊H / r⌋ (Python's float floor division)</param>
/// <param name="SmallWidth">⌊W / r⌋</param>
/// <param name="NoiseSigma">δ on the 0..255 scale; null when noise is off</param>
/// <param name="JpegQuality">q = int(uniform(30, 100)); null when JPEG is off</param>
public sealed record FirstOrderParameters(BlurKernelDraw Blur, double Scale, int SmallHeight, int SmallWidth, double? NoiseSigma, int? JpegQuality)
{
    public override string ToString() =>
        $"blur {Blur}; scale r={Scale:G6} → {SmallHeight}×{SmallWidth}; " +
        (NoiseSigma is double s ? $"noise δ={s:G6}" : "no noise") + "; " + (JpegQuality is int q ? $"JPEG q={q}" : "no JPEG");
}

/// <summary>The low-quality image and the intermediate images of one degradation (all [1,3,·,·] RGB, input dtype).</summary>
/// <param name="Lq">the LQ image at the input size (official <c>lq</c>; not clipped when noise and JPEG are off)</param>
/// <param name="Blurred">the input correlated with the kernel</param>
/// <param name="Small">the blurred image resized to ⌊H/r⌋×⌊W/r⌋ (before noise and JPEG)</param>
/// <param name="Parameters">what was drawn</param>
public sealed record DegradedImage(Tensor Lq, Tensor Blurred, Tensor Small, FirstOrderParameters Parameters) : IDisposable
{
    public void Dispose()
    {
        Lq.Dispose(); Blurred.Dispose(); Small.Dispose(); Parameters.Blur.Kernel.Dispose();
    }
}

/// <summary>
/// The synthetic training degradation of DiffBIR's stage 1 (paper §4.1, "first-order degradation"; official
/// <c>CodeformerDataset.__getitem__</c>, configs/train/train_stage1.yaml): blur with a random iso/aniso Gaussian
/// (σ ∈ [0.1, 12], 41×41), bilinear downsample by r ∈ [1, 12], add Gaussian noise δ ∈ [0, 15], JPEG at q ∈ [30, 100],
/// bilinear resize back. The defaults are train_stage1.yaml's. Images are float RGB in [0, 1], [3,H,W] or [1,3,H,W];
/// every step computes in float64 and returns the input's dtype (the official code works in float32 BGR).
/// </summary>
public sealed record FirstOrderDegradation
{
    /// <summary>blur_kernel_size.</summary>
    public int BlurKernelSize { get; init; } = 41;
    /// <summary>kernel_list.</summary>
    public IReadOnlyList<BlurKernelType> KernelList { get; init; } = new[] { BlurKernelType.Iso, BlurKernelType.Aniso };
    /// <summary>kernel_prob.</summary>
    public IReadOnlyList<double> KernelProb { get; init; } = new[] { 0.5, 0.5 };
    /// <summary>blur_sigma: the range of σx and σy.</summary>
    public ValueRange BlurSigma { get; init; } = new(0.1, 12);
    /// <summary>The rotation range of anisotropic kernels (codeformer.py passes [−π, π]).</summary>
    public ValueRange Rotation { get; init; } = new(-Math.PI, Math.PI);
    /// <summary>downsample_range: r.</summary>
    public ValueRange DownsampleRange { get; init; } = new(1, 12);
    /// <summary>noise_range: δ on the 0..255 scale; null turns noise off (and with it the clip to [0, 1]).</summary>
    public ValueRange? NoiseRange { get; init; } = new(0, 15);
    /// <summary>jpeg_range: quality; null turns JPEG off.</summary>
    public ValueRange? JpegRange { get; init; } = new(30, 100);

    /// <summary>configs/train/train_stage1.yaml (the defaults).</summary>
    public static FirstOrderDegradation TrainStage1 { get; } = new();

    /// <summary>
    /// Degrades one image, drawing in the official order: kernel type, σx (σy, θ), r, then δ and the (unused, gray_prob
    /// = 0) gray-noise coin and the normals, then q. Returns the LQ image, the intermediates and the parameters drawn.
    /// </summary>
    public DegradedImage Degrade(Tensor image, IDegradationRandom rng)
    {
        var (batched, dtype) = CheckImage(image, nameof(image));
        using var scope = torch.NewDisposeScope();
        var x = (batched ? image : image.unsqueeze(0)).to(ScalarType.Float64);
        int h = (int)x.shape[2], w = (int)x.shape[3];

        var draw = BlurKernels.RandomMixed(KernelList, KernelProb, rng, BlurKernelSize, BlurSigma, BlurSigma, Rotation);
        var blurred = Filter2D(x, draw.Kernel);

        double scale = rng.Uniform(DownsampleRange.Low, DownsampleRange.High);
        int sw = (int)PyFloorDiv(w, scale), sh = (int)PyFloorDiv(h, scale);
        if (sw < 1 || sh < 1)
            throw new ArgumentException($"a {h}×{w} image downsampled by r={scale} is empty (⌊{w}/{scale}⌋ = {sw}); use a larger image or a smaller downsample_range");
        var small = ResizeBilinear(blurred, sh, sw);

        var lq = small;
        double? sigma = null;
        if (NoiseRange != null)
        {
            sigma = rng.Uniform(NoiseRange.Low, NoiseRange.High);
            _ = rng.Uniform(0, 1);   // random_generate_gaussian_noise: `uniform() < gray_prob` with gray_prob = 0 (never gray)
            lq = AddGaussianNoise(lq, sigma.Value, rng);
        }
        int? quality = null;
        if (JpegRange != null)
        {
            quality = (int)rng.Uniform(JpegRange.Low, JpegRange.High);   // int() truncates
            lq = JpegCompress(lq, quality.Value);
        }
        lq = ResizeBilinear(lq, h, w);

        Tensor Out(Tensor t) => (batched ? t : t.squeeze(0)).to(dtype).MoveToOuterDisposeScope();
        var parameters = new FirstOrderParameters(draw with { Kernel = draw.Kernel.MoveToOuterDisposeScope() }, scale, sh, sw, sigma, quality);
        return new DegradedImage(Out(lq), Out(blurred), Out(small), parameters);
    }

    /// <summary>The stage-1 training target codeformer.py returns next to lq: gt = image·2 − 1 (in [−1, 1]).</summary>
    public static Tensor Target(Tensor image) => image * 2 - 1;

    /// <summary>
    /// cv2.filter2D(img, −1, kernel): correlation (not convolution) with the kernel's centre as anchor and
    /// BORDER_REFLECT_101 (…cb|abcd|cb…), each channel alone, as a direct float64 sum. OpenCV itself switches to a
    /// DFT for kernels of ≥ 130 taps (so the official 41×41 result differs from this by ~5e−8).
    /// </summary>
    /// <param name="image">[3,H,W] or [1,3,H,W]</param>
    /// <param name="kernel">[K,K], K odd</param>
    public static Tensor Filter2D(Tensor image, Tensor kernel)
    {
        var (batched, dtype) = CheckImage(image, nameof(image));
        if (kernel.dim() != 2 || kernel.shape[0] != kernel.shape[1] || kernel.shape[0] % 2 != 1)
            throw new ArgumentException($"kernel must be square with an odd size, got [{string.Join(",", kernel.shape)}]", nameof(kernel));
        int k = (int)kernel.shape[0];
        using var scope = torch.NewDisposeScope();
        var x = (batched ? image : image.unsqueeze(0)).to(ScalarType.Float64).contiguous();
        int c = (int)x.shape[1], h = (int)x.shape[2], w = (int)x.shape[3];
        var src = x.data<double>().ToArray();
        var kern = kernel.to(ScalarType.Float64).contiguous().data<double>().ToArray();
        var dst = Correlate(src, c, h, w, kern, k);
        var y = torch.tensor(dst, new long[] { 1, c, h, w }, ScalarType.Float64);
        return (batched ? y : y.squeeze(0)).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// cv2.resize(img, (width, height), interpolation=INTER_LINEAR): half-pixel bilinear, no antialiasing when
    /// shrinking (= torch bilinear, align_corners=False, antialias=False).
    /// </summary>
    public static Tensor ResizeBilinear(Tensor image, long height, long width)
    {
        var (batched, dtype) = CheckImage(image, nameof(image));
        using var scope = torch.NewDisposeScope();
        var x = (batched ? image : image.unsqueeze(0)).to(ScalarType.Float64);
        var y = x.shape[2] == height && x.shape[3] == width
            ? x.clone()
            : F.interpolate(x, new[] { height, width }, mode: InterpolationMode.Bilinear, align_corners: false, antialias: false);
        return (batched ? y : y.squeeze(0)).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// add_gaussian_noise (clip=True, rounds=False, gray_noise=False): img + float32(randn(h,w,c))·δ/255, clipped to
    /// [0, 1] — so even δ = 0 clips. The normals are taken in numpy's layout (H, W, BGR channels) from
    /// <paramref name="rng"/>, so a source replaying numpy's draws gives the official noise.
    /// </summary>
    /// <param name="image">[3,H,W] or [1,3,H,W] in [0, 1]</param>
    /// <param name="sigma">δ on the 0..255 scale</param>
    /// <param name="rng">supplies h·w·3 standard normals</param>
    public static Tensor AddGaussianNoise(Tensor image, double sigma, IDegradationRandom rng)
    {
        var (batched, dtype) = CheckImage(image, nameof(image));
        using var scope = torch.NewDisposeScope();
        var x = (batched ? image : image.unsqueeze(0)).to(ScalarType.Float64);
        int h = (int)x.shape[2], w = (int)x.shape[3];
        var n = rng.StandardNormal(h * w * 3);
        if (n.Length != h * w * 3) throw new InvalidOperationException($"random source returned {n.Length} normals, {h * w * 3} needed");
        // The official noise is float32: np.float32(randn) * sigma / 255. (float32 array, float32 arithmetic).
        float s32 = (float)sigma;
        var noise = new double[n.Length];
        for (int i = 0; i < n.Length; i++) noise[i] = (float)((float)n[i] * s32) / 255f;
        var hwcBgr = torch.tensor(noise, new long[] { h, w, 3 }, ScalarType.Float64);
        var chwRgb = hwcBgr.flip(2).permute(2, 0, 1).unsqueeze(0);
        var y = (x + chwRgb).clamp(0.0, 1.0);
        return (batched ? y : y.squeeze(0)).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// add_jpg_compression: clip to [0, 1], round to 8 bits, JPEG-encode at <paramref name="quality"/>, decode, /255.
    /// The encoder is ImageSharp's (baseline, 4:2:0 chroma, standard IJG tables scaled by quality), not OpenCV's
    /// libjpeg: the artefacts are of the same kind and strength, but the bytes and decoded pixels differ from the
    /// official ones.
    /// </summary>
    public static Tensor JpegCompress(Tensor image, int quality)
    {
        if (quality < 1 || quality > 100) throw new ArgumentOutOfRangeException(nameof(quality), quality, "JPEG quality must be in 1..100");
        var (batched, dtype) = CheckImage(image, nameof(image));
        using var scope = torch.NewDisposeScope();
        var x = (batched ? image : image.unsqueeze(0)).to(ScalarType.Float64);
        int h = (int)x.shape[2], w = (int)x.shape[3];
        // cv2.imencode converts float to 8 bits with saturate_cast (round half to even), like Math.Round.
        var hwc = x.clamp(0.0, 1.0).mul(255.0).squeeze(0).permute(1, 2, 0).contiguous().data<double>().ToArray();
        var bytes = new byte[hwc.Length];
        for (int i = 0; i < hwc.Length; i++) bytes[i] = (byte)Math.Clamp(Math.Round(hwc[i]), 0, 255);
        using var ms = new MemoryStream();
        using (var img = SixLabors.ImageSharp.Image.LoadPixelData<Rgb24>(bytes, w, h))
            img.Save(ms, new JpegEncoder { Quality = quality, ColorType = JpegColorType.YCbCrRatio420 });
        ms.Position = 0;
        using var decoded = SixLabors.ImageSharp.Image.Load<Rgb24>(ms);
        var back = new byte[h * w * 3];
        decoded.CopyPixelDataTo(back);
        var t = torch.tensor(back, new long[] { h, w, 3 }).to(ScalarType.Float64).div(255.0).permute(2, 0, 1).unsqueeze(0);
        return (batched ? t : t.squeeze(0)).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>Python's float floor division <c>a // b</c> (fmod-based: 1 // 0.1 is 9, not 10).</summary>
    public static double PyFloorDiv(double a, double b)
    {
        double mod = a % b;   // C# % on doubles is C's fmod
        double div = (a - mod) / b;
        if (mod != 0 && (b < 0) != (mod < 0)) div -= 1.0;
        if (div == 0) return Math.CopySign(0.0, a / b);
        double floordiv = Math.Floor(div);
        if (div - floordiv > 0.5) floordiv += 1.0;
        return floordiv;
    }

    static (bool Batched, ScalarType Dtype) CheckImage(Tensor image, string name)
    {
        bool ok = (image.dim() == 3 && image.shape[0] == 3) || (image.dim() == 4 && image.shape[0] == 1 && image.shape[1] == 3);
        if (!ok) throw new ArgumentException($"expected one RGB image [3,H,W] or [1,3,H,W], got [{string.Join(",", image.shape)}]", name);
        if (!image.is_floating_point()) throw new ArgumentException($"expected a float image in [0, 1], got {image.dtype} (convert uint8 with ImageIO.FromUInt8)", name);
        return (image.dim() == 4, image.dtype);
    }

    /// <summary>Direct K×K correlation with reflect-101 borders; the inner loop runs along a row (SIMD).</summary>
    static double[] Correlate(double[] src, int c, int h, int w, double[] kern, int k)
    {
        int r = k / 2, hp = h + 2 * r, wp = w + 2 * r;
        var rowIdx = new int[hp];
        var colIdx = new int[wp];
        for (int i = 0; i < hp; i++) rowIdx[i] = Reflect101(i - r, h);
        for (int j = 0; j < wp; j++) colIdx[j] = Reflect101(j - r, w);
        var dst = new double[c * h * w];
        Parallel.For(0, c * h, cy =>
        {
            int ch = cy / h, y = cy % h;
            var padded = new double[k * wp];   // the k source rows this output row needs, padded horizontally
            for (int i = 0; i < k; i++)
            {
                int srow = ch * h * w + rowIdx[y + i] * w;
                for (int j = 0; j < wp; j++) padded[i * wp + j] = src[srow + colIdx[j]];
            }
            var acc = new double[w];
            // Blocks of 4 SIMD vectors along the row stay in registers while all K² taps accumulate into them.
            int vw = Vector<double>.Count, block = 4 * vw, x = 0;
            ref double pad0 = ref MemoryMarshal.GetArrayDataReference(padded);
            for (; x + block <= w; x += block)
            {
                Vector<double> a0 = default, a1 = default, a2 = default, a3 = default;
                for (int i = 0; i < k; i++)
                for (int j = 0; j < k; j++)
                {
                    double kij = kern[i * k + j];
                    if (kij == 0) continue;
                    var kv = new Vector<double>(kij);
                    nuint o = (nuint)(i * wp + j + x);
                    a0 += kv * Vector.LoadUnsafe(ref pad0, o);
                    a1 += kv * Vector.LoadUnsafe(ref pad0, o + (nuint)vw);
                    a2 += kv * Vector.LoadUnsafe(ref pad0, o + (nuint)(2 * vw));
                    a3 += kv * Vector.LoadUnsafe(ref pad0, o + (nuint)(3 * vw));
                }
                a0.CopyTo(acc, x); a1.CopyTo(acc, x + vw); a2.CopyTo(acc, x + 2 * vw); a3.CopyTo(acc, x + 3 * vw);
            }
            for (; x < w; x++)
            {
                double sum = 0;
                for (int i = 0; i < k; i++)
                for (int j = 0; j < k; j++)
                    sum += kern[i * k + j] * padded[i * wp + j + x];
                acc[x] = sum;
            }
            Array.Copy(acc, 0, dst, ch * h * w + y * w, w);
        });
        return dst;
    }

    /// <summary>OpenCV's borderInterpolate for BORDER_REFLECT_101 (reflects repeatedly when the pad exceeds the size).</summary>
    static int Reflect101(int p, int len)
    {
        if (len == 1) return 0;
        while ((uint)p >= (uint)len)
            p = p < 0 ? -p : 2 * len - 2 - p;
        return p;
    }
}
