using System.Text.Json.Nodes;
using DiffBIR.Lab.Degradation;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// degradation_kernels.safetensors: the blur kernels of diffbir/dataset/degradation.py at explicit parameters, the
/// kernels random_mixed_kernels returns for scripted draws, and two first-order degradations of codeformer.py
/// (blur → bilinear down → bilinear up; noise and JPEG off) replayed with their scripted draws.
/// </summary>
/// <remarks>
/// Tolerances (fixture README): kernels are float64 closed forms, abs 1e−13 (absolute because σ = 0.1 tails are
/// ~1e−22..1e−87). Our first-order path is float64 with a direct correlation; the official one is float32 with OpenCV's
/// DFT filter (measured official − float64 reference: blurred 5.3e−8, small 2.9e−7, lq 2.4e−7), so blurred / small /
/// lq are held to abs 1e−6 and the harness float64 reference <c>ref64.&lt;fo&gt;.lq</c> to abs 1e−12. gt is exact.
/// </remarks>
public sealed class DegradationKernelsCase : IParityCase
{
    public string Case => "degradation_kernels";
    public string Description => "blur kernels (Gaussian, generalized, plateau, sinc, random_mixed) and the first-order LQ path";
    public Tolerance DefaultTolerance => Kernel;

    static readonly Tolerance Kernel = new(0, 1e-13);
    static readonly Tolerance OfficialFloat32 = new(0, 1e-6);
    static readonly Tolerance Float64Reference = new(0, 1e-12);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var config = f.Config!.AsObject();
        foreach (var (name, node) in config)
        {
            var p = node!.AsObject();
            if (name.StartsWith("fo_", StringComparison.Ordinal))
            {
                foreach (var o in FirstOrder(f, name, p)) yield return o;
                continue;
            }
            yield return new CaseOutput(name, KernelOf(name, p), Tolerance: Kernel);
        }
    }

    static Tensor KernelOf(string name, JsonObject p)
    {
        int k = (int)p["kernel_size"]!;
        double D(string key) => (double)p[key]!;
        var family = name[..name.LastIndexOf('.')];
        return family switch
        {
            "gaussian_iso" or "gaussian_aniso" => BlurKernels.BivariateGaussian(k, D("sig_x"), D("sig_y"), D("theta"), (bool)p["isotropic"]!),
            "generalized_iso" or "generalized_aniso" =>
                BlurKernels.BivariateGeneralizedGaussian(k, D("sig_x"), D("sig_y"), D("theta"), D("beta"), (bool)p["isotropic"]!),
            "plateau_iso" or "plateau_aniso" => BlurKernels.BivariatePlateau(k, D("sig_x"), D("sig_y"), D("theta"), D("beta"), (bool)p["isotropic"]!),
            "sinc" => BlurKernels.CircularLowpass(D("cutoff"), k, (int)p["pad_to"]!),
            "codeformer_kernel" => CodeformerKernel(p, k),
            _ => throw new InvalidOperationException($"degradation_kernels: unknown kernel family '{family}' in config['{name}']"),
        };
    }

    /// <summary>random_mixed_kernels exactly as codeformer.py calls it, replaying the recorded draws.</summary>
    static Tensor CodeformerKernel(JsonObject p, int k)
    {
        var list = p["kernel_list"]!.AsArray().Select(x => BlurKernels.Parse((string)x!)).ToArray();
        var prob = p["kernel_prob"]!.AsArray().Select(x => (double)x!).ToArray();
        var type = BlurKernels.Parse((string)p["kernel_type"]!);
        var sr = p["sigma_range"]!.AsArray();
        var sigma = new ValueRange((double)sr[0]!, (double)sr[1]!);
        var rng = new ScriptedDegradationRandom(DrawsOf(p, type), new[] { Array.IndexOf(list, type) });
        var draw = BlurKernels.RandomMixed(list, prob, rng, k, sigma, sigma, new ValueRange(-Math.PI, Math.PI));
        Expect(rng.RemainingUniforms == 0 && rng.RemainingChoices == 0, "codeformer_kernel: not every scripted draw was used");
        return draw.Kernel;
    }

    static IEnumerable<double> DrawsOf(JsonObject p, BlurKernelType type)
    {
        if (type == BlurKernelType.Iso) return new[] { (double)(p["sigma_x"] ?? p["sigma"])! };
        return new[] { (double)p["sigma_x"]!, (double)p["sigma_y"]!, (double)p["rotation"]! };
    }

    static IEnumerable<CaseOutput> FirstOrder(Fixture f, string name, JsonObject p)
    {
        var ds = p["codeformer_dataset"]!.AsObject();
        var list = ds["kernel_list"]!.AsArray().Select(x => BlurKernels.Parse((string)x!)).ToArray();
        var type = BlurKernels.Parse((string)p["kernel_type"]!);
        Expect(ds["noise_range"] is null && ds["jpeg_range"] is null, $"{name}: the fixture is expected to turn noise and JPEG off");
        var degradation = new FirstOrderDegradation
        {
            BlurKernelSize = (int)ds["blur_kernel_size"]!,
            KernelList = list,
            KernelProb = ds["kernel_prob"]!.AsArray().Select(x => (double)x!).ToArray(),
            BlurSigma = RangeOf(ds["blur_sigma"]!),
            DownsampleRange = RangeOf(ds["downsample_range"]!),
            NoiseRange = null,
            JpegRange = null,
        };
        DegradedImage Replay(Tensor image)
        {
            // The dataset's first draw (prompt drop, uniform() = 0.75) belongs to the text side, not to the degradation.
            var rng = new ScriptedDegradationRandom(DrawsOf(p, type).Append((double)p["scale"]!), new[] { Array.IndexOf(list, type) });
            var result = degradation.Degrade(image, rng);
            Expect(rng.RemainingUniforms == 0 && rng.RemainingChoices == 0, $"{name}: not every scripted draw was used");
            return result;
        }

        // img_gt = (rgb / 255.0).astype(float32), as codeformer.py; we compute on it in float64.
        var rgb = f.In($"{name}.image").permute(2, 0, 1).unsqueeze(0);
        var img64 = rgb.to(ScalarType.Float64).div(255.0);
        var img32 = img64.to(ScalarType.Float32);
        var d = Replay(img32.to(ScalarType.Float64));
        // The harness reference starts from rgb / 255 in float64 (not rounded to float32 first).
        var d64 = Replay(img64);

        static Tensor Hwc(Tensor t) => t.squeeze(0).permute(1, 2, 0);
        yield return new CaseOutput($"{name}.kernel", d.Parameters.Blur.Kernel, Tolerance: Kernel);
        yield return new CaseOutput($"{name}.blurred", Hwc(d.Blurred), Tolerance: OfficialFloat32);
        yield return new CaseOutput($"{name}.small", Hwc(d.Small), Tolerance: OfficialFloat32);
        yield return new CaseOutput($"{name}.lq", Hwc(d.Lq), Tolerance: OfficialFloat32);
        yield return new CaseOutput($"{name}.gt", Hwc(FirstOrderDegradation.Target(img32)), Tolerance: new(0, 0));
        // Not an official output: the harness's float64 reference, which a float64 port should reproduce almost exactly.
        yield return new CaseOutput($"ref64.{name}.lq", Hwc(d64.Lq), Tolerance: Float64Reference, Expected: f.Get($"ref64.{name}.lq"));
    }

    static ValueRange RangeOf(JsonNode n) => new((double)n[0]!, (double)n[1]!);

    static void Expect(bool ok, string message)
    {
        if (!ok) throw new InvalidOperationException("degradation_kernels: " + message);
    }
}
