using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// The registry of implemented parity cases: every public, non-abstract <see cref="IParityCase"/> with a
/// parameterless constructor in this assembly. A new network or sampler registers its case by defining the class.
/// </summary>
public static class ParityCases
{
    public static IEnumerable<IParityCase> All() =>
        typeof(IParityCase).Assembly.GetTypes()
            .Where(t => t is { IsAbstract: false, IsInterface: false, IsPublic: true } && typeof(IParityCase).IsAssignableFrom(t)
                        && t.GetConstructor(Type.EmptyTypes) != null)
            .OrderBy(t => t.FullName, StringComparer.Ordinal)
            .Select(t => (IParityCase)Activator.CreateInstance(t)!);
}

/// <summary>
/// checkpoints/expected.json: every PyTorch checkpoint layout the released weights use (zip, legacy, Lightning,
/// DataParallel, BasicSR params_ema, views of shared storages) loads with exact values; truncated and hostile files
/// are refused.
/// </summary>
public sealed class CheckpointFormatsCase : IParityCase
{
    public string Case => "checkpoint_formats";
    public string Description => "PyTorch checkpoint layouts (checkpoints/expected.json): exact values, hostile files refused";
    public Tolerance DefaultTolerance => new(0, 0);

    static readonly string[] Loadable = { "plain_state_dict.pth", "lightning_style.ckpt", "dataparallel_prefix.pth", "params_ema.pth", "legacy_format.pt" };
    static readonly string[] Refused = { "truncated.pth", "malicious_reduce.pth", "malicious_eval.ckpt" };

    public IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var dir = Path.GetDirectoryName(fixture.Path)!;
        var expected = JsonNode.Parse(File.ReadAllText(fixture.Path))!.AsObject();
        var shapes = expected["tensors"]!.AsObject();
        var values = expected["values_as_float32_flat"]!.AsObject();
        var outputs = new List<CaseOutput>();

        foreach (var file in Loadable)
        {
            using var sd = Checkpoint.Load(Path.Combine(dir, file));
            foreach (var (key, info) in shapes)
            {
                var name = $"{file}/{key}";
                if (!sd.Tensors.TryGetValue(key, out var t)) { outputs.Add(new CaseOutput(name, torch.tensor(0f), Expected: torch.tensor(float.NaN))); continue; }
                outputs.Add(ValueCheck(name, t, info!.AsObject(), values[key]!.AsArray()));
            }
        }
        // storage_views.pth has its own expected entries.
        if (expected["storage_views.pth"] is JsonObject views)
        {
            using var sd = Checkpoint.Load(Path.Combine(dir, "storage_views.pth"));
            var vShapes = views["tensors"]!.AsObject();
            var vValues = views["values_as_float32_flat"]!.AsObject();
            foreach (var (key, info) in vShapes)
                outputs.Add(sd.Tensors.TryGetValue(key, out var t)
                    ? ValueCheck($"storage_views.pth/{key}", t, info!.AsObject(), vValues[key]!.AsArray())
                    : new CaseOutput($"storage_views.pth/{key}", torch.tensor(0f), Expected: torch.tensor(float.NaN)));
        }
        foreach (var file in Refused)
        {
            bool refused;
            try { using var _ = Checkpoint.Load(Path.Combine(dir, file)); refused = false; }
            catch (CheckpointException) { refused = true; }
            outputs.Add(new CaseOutput($"{file}/refused", torch.tensor(refused ? 1f : 0f), Expected: torch.tensor(1f)));
        }
        return outputs;
    }

    static CaseOutput ValueCheck(string name, Tensor t, JsonObject info, JsonArray flat)
    {
        var wantShape = info["shape"]!.AsArray().Select(x => (long)x!).ToArray();
        var wantDtype = (string)info["dtype"]!;
        var gotDtype = t.dtype switch
        {
            ScalarType.Float32 => "float32", ScalarType.Float16 => "float16", ScalarType.BFloat16 => "bfloat16",
            ScalarType.Int64 => "int64", ScalarType.Float64 => "float64", _ => t.dtype.ToString(),
        };
        var exp = torch.tensor(flat.Select(x => (float)(double)x!).ToArray(), ScalarType.Float32).reshape(wantShape);
        if (gotDtype != wantDtype)
            return new CaseOutput(name, torch.tensor(float.NaN), Expected: torch.tensor(0f)); // dtype mismatch → fails
        return new CaseOutput(name, t.to(ScalarType.Float32), Expected: exp);
    }
}

/// <summary>diffusion_schedule: β, ᾱ, the float32 buffers, q_sample and the v target for v2 and v2.1.</summary>
public sealed class DiffusionScheduleCase : IParityCase
{
    public string Case => "diffusion_schedule";
    public string Description => "noise schedules (linear-sqrt, zero terminal SNR), q_sample, v target";
    public Tolerance DefaultTolerance => new(1e-6, 1e-7);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        foreach (var (name, s) in new[] { ("v2", NoiseSchedule.V2), ("v2.1", NoiseSchedule.V2_1) })
        {
            var (sa, s1ma) = s.Buffers();
            yield return new CaseOutput($"{name}.betas", torch.tensor(s.Betas(), ScalarType.Float64), Tolerance: new(1e-12, 0));
            yield return new CaseOutput($"{name}.alphas_cumprod", torch.tensor(s.AlphasCumprod(), ScalarType.Float64), Tolerance: new(1e-12, 0));
            yield return new CaseOutput($"{name}.sqrt_alphas_cumprod", sa, Tolerance: new(0, 0));
            yield return new CaseOutput($"{name}.sqrt_one_minus_alphas_cumprod", s1ma, Tolerance: new(0, 0));
            var x0 = f.In($"{name}.q_sample.x_start");
            var t = f.In($"{name}.q_sample.t");
            var noise = f.In($"{name}.q_sample.noise");
            yield return new CaseOutput($"{name}.q_sample.x_t", s.QSample(x0, t, noise));
            yield return new CaseOutput($"{name}.q_sample.v", s.Velocity(x0, t, noise));
        }
    }
}

/// <summary>schema/sd_checkpoint_key_map.json: our SD-prefix mapping gives ControlLDM's key for every SD key.</summary>
public sealed class SdKeyMapCase : IParityCase
{
    public string Case => "schema_sd_checkpoint_key_map";
    public string Description => "Stable Diffusion checkpoint keys → ControlLDM keys (unet / vae / clip prefixes)";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var map = JsonNode.Parse(File.ReadAllText(fixture.Path))!["map"]!.AsObject();
        var wrong = map.Where(kv => SdCheckpointKeys.Map(kv.Key) != (string?)kv.Value).Select(kv => kv.Key).ToList();
        var note = wrong.Count == 0 ? null : "first wrong: " + wrong[0];
        yield return new CaseOutput($"keys mapped wrongly (of {map.Count})", torch.tensor((float)wrong.Count), Expected: torch.tensor(0f));
    }
}

/// <summary>metrics: PSNR (official calculate_psnr_pt, RGB and Y with crop), Y conversion, MSE, SSIM (skimage settings).</summary>
public sealed class MetricsCase : IParityCase
{
    public string Case => "metrics";
    public string Description => "PSNR / Y / MSE / SSIM as the official code and skimage compute them";
    // README: float64 everywhere; PSNR abs 1e-9 dB, SSIM abs 1e-10, Y abs 1e-12, MSE rel 1e-12.
    public Tolerance DefaultTolerance => new(0, 1e-9);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var pairs = f.Config!["pairs"]!.AsArray().Select(p => (string)p!["name"]!).ToList();
        foreach (var p in pairs)
        {
            var a8 = f.In($"{p}.a"); var b8 = f.In($"{p}.b");
            var a = a8.permute(0, 3, 1, 2).to(ScalarType.Float64) / 255.0;
            var b = b8.permute(0, 3, 1, 2).to(ScalarType.Float64) / 255.0;
            var a32 = a8.permute(0, 3, 1, 2).to(ScalarType.Float32) / 255f;
            var b32 = b8.permute(0, 3, 1, 2).to(ScalarType.Float32) / 255f;
            yield return new CaseOutput($"{p}.psnr_rgb", Metrics.ImageMetrics.Psnr(a, b));
            yield return new CaseOutput($"{p}.psnr_y_crop4", Metrics.ImageMetrics.Psnr(a, b, 4, yChannel: true));
            // A float32 port lands within ~6e-7 dB of the official float32-input values (README).
            yield return new CaseOutput($"{p}.psnr_rgb_f32in", Metrics.ImageMetrics.Psnr(a32, b32), Tolerance: new(0, 1e-6));
            yield return new CaseOutput($"{p}.psnr_y_crop4_f32in", Metrics.ImageMetrics.Psnr(a32, b32, 4, yChannel: true), Tolerance: new(0, 1e-6));
            yield return new CaseOutput($"{p}.y_a", Metrics.ImageMetrics.RgbToY(a), Tolerance: new(0, 1e-12));
            yield return new CaseOutput($"{p}.y_b", Metrics.ImageMetrics.RgbToY(b), Tolerance: new(0, 1e-12));
            yield return new CaseOutput($"{p}.mse_rgb", Metrics.ImageMetrics.Mse(a, b), Tolerance: new(1e-12, 0));
            yield return new CaseOutput($"{p}.mse_y_crop4", Metrics.ImageMetrics.Mse(a, b, 4, yChannel: true), Tolerance: new(1e-12, 0));
            var mse255 = (a8.to(ScalarType.Float64) - b8.to(ScalarType.Float64)).pow(2).mean().reshape(1);
            yield return new CaseOutput($"{p}.mse_rgb_255", mse255, Tolerance: new(1e-12, 0));
            yield return new CaseOutput($"{p}.psnr_rgb_skimage", 10.0 * torch.log10(255.0 * 255.0 / mse255));
            var a255 = a8.permute(0, 3, 1, 2).to(ScalarType.Float64);
            var b255 = b8.permute(0, 3, 1, 2).to(ScalarType.Float64);
            yield return new CaseOutput($"{p}.ssim_rgb", Metrics.ImageMetrics.Ssim(a255, b255, 255), Tolerance: new(0, 1e-10));
            var ya = Metrics.ImageMetrics.RgbToY(a) * 255.0; var yb = Metrics.ImageMetrics.RgbToY(b) * 255.0;
            yield return new CaseOutput($"{p}.ssim_y", Metrics.ImageMetrics.Ssim(ya, yb, 255), Tolerance: new(0, 1e-10));
            yield return new CaseOutput($"{p}.ssim_y_crop4", Metrics.ImageMetrics.Ssim(ya[.., .., 4..^4, 4..^4], yb[.., .., 4..^4, 4..^4], 255), Tolerance: new(0, 1e-10));
        }
    }
}
