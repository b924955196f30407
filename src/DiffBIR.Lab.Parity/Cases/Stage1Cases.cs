using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Stage1;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>Shared steps of the stage-1 cases: build from the fixture config, load strictly, run one forward.</summary>
internal static class Stage1Case
{
    /// <summary>Loads a fixture's weights (strict: the keys must be exactly the official ones) and runs <c>in.x</c>.</summary>
    public static Tensor Forward(nn.Module<Tensor, Tensor> model, Fixture f, string? module = null)
    {
        StateDictLoader.Load(model, f.Weights(module), strict: true, sourceName: f.Path);
        model.eval();
        using var _ = no_grad();
        return model.forward(f.In("x"));
    }
}

/// <summary>bsrnet: the tiny RRDBNet (×4) on a 16×16 input.</summary>
public sealed class BsrnetCase : IParityCase
{
    public string Case => "bsrnet";
    public string Description => "BSRNet = RRDBNet ×4 (diffbir/model/bsrnet.py)";
    // README: float32 vs float64 max_rel 6.75e-07.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new RRDBNet(RRDBNetConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>swinir: DiffBIR's SwinIR (unshuffle ×8, nearest+conv) on a 64×64 input; the mask is recomputed for the 8×8 token grid.</summary>
public sealed class SwinIRCase : IParityCase
{
    public string Case => "swinir";
    public string Description => "SwinIR with pixel-unshuffle ×8 and nearest+conv upsampling (diffbir/model/swinir.py)";
    // README: float32 vs float64 max_rel 1.18e-06.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new SwinIR(SwinIRConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>scunet: the tiny SCUNet (stages 3, body, up3 without blocks) on a 64×64 input.</summary>
public sealed class SCUNetCase : IParityCase
{
    public string Case => "scunet";
    public string Description => "SCUNet (diffbir/model/scunet.py)";
    // README: float32 vs float64 max_rel 1.05e-06.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new SCUNet(SCUNetConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>schema/bsrnet.json: the released BSRNet.pth keys and shapes.</summary>
public sealed class BsrnetSchemaCase : SchemaCase
{
    public override string Case => "schema_bsrnet";
    public override string Description => "full-size RRDBNet (configs/inference/bsrnet.yaml): keys, shapes, element count";
    protected override string SummaryKey => "bsrnet";
    protected override nn.Module Build() => new RRDBNet(RRDBNetConfig.Full);
}

/// <summary>schema/swinir.json: the released SwinIR keys and shapes (with the persistent buffers).</summary>
public sealed class SwinIRSchemaCase : SchemaCase
{
    public override string Case => "schema_swinir";
    public override string Description => "full-size SwinIR (configs/inference/swinir.yaml): keys, shapes, element count";
    protected override string SummaryKey => "swinir";
    protected override nn.Module Build() => new SwinIR(SwinIRConfig.Full);
}

/// <summary>schema/scunet.json: the released scunet_color_real_psnr.pth keys and shapes.</summary>
public sealed class SCUNetSchemaCase : SchemaCase
{
    public override string Case => "schema_scunet";
    public override string Description => "full-size SCUNet (configs/inference/scunet.yaml): keys, shapes, element count";
    protected override string SummaryKey => "scunet";
    protected override nn.Module Build() => new SCUNet(SCUNetConfig.Full);
}
