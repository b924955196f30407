using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// unet_controlnet: ControlLDM.forward = ControlNet (IRControlNet) + ControlledUnetModel on a tiny SD-shaped config.
/// out.control.k = the unscaled ControlNet outputs; out.eps_&lt;s&gt; with control_scales[s]; out.eps_nocontrol = the plain UNet.
/// </summary>
public sealed class UNetControlNetCase : IParityCase
{
    public string Case => "unet_controlnet";
    public string Description => "SD 2.1 UNet (ControlledUnetModel) + IRControlNet, control scales, plain UNet";
    // README: float32 vs float64 max_rel ≤ 9.4e-7 for every output.
    public Tolerance DefaultTolerance => new(1e-5, 1e-6);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var cfg = f.Config!;
        using var unet = new UNetModel(UNetConfig.FromJson(cfg["unet_cfg"]!));
        using var controlnet = new ControlNet(UNetConfig.FromJson(cfg["controlnet_cfg"]!));
        StateDictLoader.Load(unet, f.Weights("unet"), sourceName: f.Path + " weights.unet");
        StateDictLoader.Load(controlnet, f.Weights("controlnet"), sourceName: f.Path + " weights.controlnet");
        // The fixtures were made with ATTN_MODE=vanilla.
        unet.AttentionMode = AttentionMode.Vanilla;
        controlnet.AttentionMode = AttentionMode.Vanilla;
        unet.eval(); controlnet.eval();

        var x = f.In("x"); var t = f.In("t"); var context = f.In("context"); var hint = f.In("hint");
        var results = new List<CaseOutput>();
        using var _ = torch.no_grad();
        using var control = controlnet.forward(x, hint, t, context);
        for (int k = 0; k < control.Residuals.Count; k++)
            results.Add(new CaseOutput($"control.{k}", control.Residuals[k].clone()));
        foreach (var (name, scales) in cfg["control_scales"]!.AsObject())
        {
            using var scaled = control.Scaled(scales!.AsArray().Select(s => (double)s!).ToList());
            results.Add(new CaseOutput($"eps_{name}", unet.forward(x, t, context, scaled)));
        }
        results.Add(new CaseOutput("eps_nocontrol", unet.forward(x, t, context)));
        return results;
    }
}

/// <summary>schema/unet.json: the SD 2.1 UNet of configs/inference/cldm.yaml (unet_cfg).</summary>
public sealed class UNetSchemaCase : SchemaCase
{
    public override string Case => "schema_unet";
    public override string Description => "full-size SD 2.1 UNet: keys, shapes, 865,910,724 parameters";
    protected override string SummaryKey => "unet";
    protected override nn.Module Build() => new UNetModel(UNetConfig.Sd21);
}

/// <summary>schema/controlnet.json: the IRControlNet of configs/inference/cldm.yaml (controlnet_cfg).</summary>
public sealed class ControlNetSchemaCase : SchemaCase
{
    public override string Case => "schema_controlnet";
    public override string Description => "full-size IRControlNet: keys, shapes, 363,153,280 parameters";
    protected override string SummaryKey => "controlnet";
    protected override nn.Module Build() => new ControlNet(UNetConfig.Sd21);
}

/// <summary>schema/cldm.json: the whole ControlLDM (unet., vae., clip., controlnet. prefixes) of configs/inference/cldm.yaml.</summary>
public sealed class CldmSchemaCase : SchemaCase
{
    public override string Case => "schema_cldm";
    public override string Description => "full-size ControlLDM = UNet + VAE + CLIP text encoder + IRControlNet";
    protected override string SummaryKey => "unet"; // not used: the total is the sum of the four components

    protected override nn.Module Build() => new Models.ControlLDM(Models.ControlLdmConfig.Sd21);

    public override IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var schema = Schema.Load(fixture.Path);
        var summary = LoadingSummary(fixture);
        var parts = new[] { "unet", "vae", "clip", "controlnet" };
        var (report, keys, values) = Measure(Build, schema);
        static string First(IReadOnlyList<string> xs) => xs.Count == 0 ? "" : $" (first: {xs[0]})";
        yield return Count("missing keys" + First(report!.Missing), report.Missing.Count, 0);
        yield return Count("unexpected keys" + First(report.Unexpected), report.Unexpected.Count, 0);
        yield return Count("shape mismatches" + First(report.ShapeMismatches), report.ShapeMismatches.Count, 0);
        yield return Count("keys (sum of loading.json)", keys, parts.Sum(p => (long)summary[p]!["keys"]!));
        yield return Count("values (sum of loading.json)", values, parts.Sum(p => (long)summary[p]!["numel"]!));
        yield return Count("values (schema file)", values, schema.NumElements);
    }
}

/// <summary>schema/diffusion.json: the Diffusion module's two float32 buffers (v2 schedule).</summary>
public sealed class DiffusionSchemaCase : SchemaCase
{
    public override string Case => "schema_diffusion";
    public override string Description => "Diffusion buffers sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod (v2)";
    protected override string SummaryKey => "diffusion";
    protected override nn.Module Build() => new Models.DiffusionBuffers(Diffusion.NoiseSchedule.V2);
}

/// <summary>schema/diffusion_v2.1.json: the same buffers for the zero-terminal-SNR schedule.</summary>
public sealed class DiffusionV21SchemaCase : SchemaCase
{
    public override string Case => "schema_diffusion_v2.1";
    public override string Description => "Diffusion buffers (v2.1, zero terminal SNR)";
    protected override string SummaryKey => "diffusion_v2.1";
    protected override nn.Module Build() => new Models.DiffusionBuffers(Diffusion.NoiseSchedule.V2_1);
}

/// <summary>
/// schema/loading.json: the key and value counts of every released module. Each is built full-size on the meta device
/// and counted (the per-module schema cases check the keys and shapes themselves).
/// </summary>
public sealed class LoadingSummaryCase : IParityCase
{
    public string Case => "schema_loading";
    public string Description => "key and value counts of all nine released modules (loading.json summary)";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var summary = JsonNode.Parse(File.ReadAllText(fixture.Path))!["summary"]!.AsObject();
        var builders = new Dictionary<string, Func<nn.Module>>
        {
            ["unet"] = () => new UNetModel(UNetConfig.Sd21),
            ["controlnet"] = () => new ControlNet(UNetConfig.Sd21),
            ["vae"] = () => new Models.Vae.AutoencoderKL(Models.Vae.VaeConfig.Sd21),
            ["clip"] = () => new Models.Clip.FrozenOpenClipEmbedder(Models.Clip.ClipConfig.VitH14),
            ["swinir"] = () => new Models.Stage1.SwinIR(Models.Stage1.SwinIRConfig.Full),
            ["bsrnet"] = () => new Models.Stage1.RRDBNet(Models.Stage1.RRDBNetConfig.Full),
            ["scunet"] = () => new Models.Stage1.SCUNet(Models.Stage1.SCUNetConfig.Full),
            ["diffusion"] = () => new Models.DiffusionBuffers(Diffusion.NoiseSchedule.V2),
            ["diffusion_v2.1"] = () => new Models.DiffusionBuffers(Diffusion.NoiseSchedule.V2_1),
        };
        foreach (var (name, entry) in summary)
        {
            if (!builders.TryGetValue(name, out var build))
            {
                yield return new CaseOutput($"{name}: module known", torch.tensor(0.0), Expected: torch.tensor(1.0));
                continue;
            }
            var (_, keys, values) = SchemaCase.Measure(build);
            yield return SchemaCase.Count($"{name}.keys", keys, (long)entry!["keys"]!);
            yield return SchemaCase.Count($"{name}.values", values, (long)entry["numel"]!);
        }
    }
}
