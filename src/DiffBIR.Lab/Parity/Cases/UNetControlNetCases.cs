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

/// <summary>Shared check of a full-size schema: built on the meta device (nothing allocated), keys/shapes and the parameter count.</summary>
public abstract class SdSchemaCase : IParityCase
{
    public abstract string Case { get; }
    public abstract string Description { get; }
    public Tolerance DefaultTolerance => new(0, 0);
    protected abstract string SummaryKey { get; }
    protected abstract nn.Module Build();

    public IEnumerable<CaseOutput> Run(Fixture fixture)
    {
        var schema = Schema.Load(fixture.Path);
        var loading = JsonNode.Parse(File.ReadAllText(Path.Combine(Path.GetDirectoryName(fixture.Path)!, "loading.json")))!;
        long numel = (long)loading["summary"]![SummaryKey]!["numel"]!;
        long keys = (long)loading["summary"]![SummaryKey]!["keys"]!;
        LoadReport report;
        long ours, ourKeys;
        torch.set_default_device(torch.device("meta"));
        try
        {
            using var m = Build();
            report = schema.Compare(m);
            var sd = m.state_dict();
            ours = sd.Values.Sum(v => v.numel());
            ourKeys = sd.Count;
        }
        finally { torch.set_default_device(torch.CPU); }
        return new[]
        {
            new CaseOutput("missing keys", torch.tensor((double)report.Missing.Count), Expected: torch.tensor(0.0)),
            new CaseOutput("unexpected keys", torch.tensor((double)report.Unexpected.Count), Expected: torch.tensor(0.0)),
            new CaseOutput("shape mismatches", torch.tensor((double)report.ShapeMismatches.Count), Expected: torch.tensor(0.0)),
            new CaseOutput("keys", torch.tensor((double)ourKeys), Expected: torch.tensor((double)keys)),
            new CaseOutput("numel", torch.tensor((double)ours), Expected: torch.tensor((double)numel)),
            new CaseOutput("numel (schema file)", torch.tensor((double)ours), Expected: torch.tensor((double)schema.NumElements)),
        };
    }
}

/// <summary>schema/unet.json: the SD 2.1 UNet of configs/inference/cldm.yaml (unet_cfg).</summary>
public sealed class UNetSchemaCase : SdSchemaCase
{
    public override string Case => "schema_unet";
    public override string Description => "full-size SD 2.1 UNet: keys, shapes, 865,910,724 parameters";
    protected override string SummaryKey => "unet";
    protected override nn.Module Build() => new UNetModel(UNetConfig.Sd21);
}

/// <summary>schema/controlnet.json: the IRControlNet of configs/inference/cldm.yaml (controlnet_cfg).</summary>
public sealed class ControlNetSchemaCase : SdSchemaCase
{
    public override string Case => "schema_controlnet";
    public override string Description => "full-size IRControlNet: keys, shapes, 363,153,280 parameters";
    protected override string SummaryKey => "controlnet";
    protected override nn.Module Build() => new ControlNet(UNetConfig.Sd21);
}
