using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models;

/// <summary>Constructor arguments of <see cref="ControlLDM"/> (official configs/inference/cldm.yaml).</summary>
public sealed record ControlLdmConfig
{
    public UNetConfig Unet { get; init; } = UNetConfig.Sd21;
    public VaeConfig Vae { get; init; } = VaeConfig.Sd21;
    public ClipConfig Clip { get; init; } = ClipConfig.VitH14;
    public UNetConfig ControlNet { get; init; } = UNetConfig.Sd21;
    /// <summary>z_unet = 0.18215 · z_vae (Stable Diffusion's latent scale).</summary>
    public double LatentScaleFactor { get; init; } = 0.18215;
    /// <summary>How control enters the UNet: the official IRControlNet (Add), or the seed's Variants 5 / 6.</summary>
    public ControlMode Mode { get; init; } = ControlMode.Add;

    /// <summary>The released model: SD 2.1 base + IRControlNet (the same for v1, v2 and v2.1).</summary>
    public static ControlLdmConfig Sd21 { get; } = new();

    /// <summary>Reads <c>{unet_cfg, vae_cfg, clip_cfg, controlnet_cfg, latent_scale_factor}</c> (fixture configs, cldm.yaml as JSON).</summary>
    public static ControlLdmConfig FromJson(JsonNode n) => new()
    {
        Unet = UNetConfig.FromJson(n["unet_cfg"]!),
        Vae = VaeConfig.FromJson(n["vae_cfg"]!),
        Clip = ClipConfig.FromJson(n["clip_cfg"]!),
        ControlNet = UNetConfig.FromJson(n["controlnet_cfg"]!),
        LatentScaleFactor = (double?)n["latent_scale_factor"] ?? 0.18215,
    };
}

/// <summary>
/// Stage 2 of DiffBIR (official <c>diffbir.model.cldm.ControlLDM</c>): Stable Diffusion's UNet, VAE and OpenCLIP text
/// encoder, plus the IRControlNet that sees the VAE latent of the stage-1 output concatenated to the noisy latent.
/// Its state dict keys are <c>unet.*</c>, <c>vae.*</c>, <c>clip.*</c>, <c>controlnet.*</c> (schema/cldm.json).
/// As an <see cref="IDenoiser"/> it is the network every sampler calls.
/// </summary>
public sealed class ControlLDM : nn.Module, IDenoiser
{
    public readonly UNetModel unet;
    public readonly AutoencoderKL vae;
    public readonly FrozenOpenClipEmbedder clip;
    public readonly ControlNet controlnet;

    public ControlLdmConfig Config { get; }

    /// <summary>Scales of the 13 control outputs (official <c>control_scales</c>; the pipeline sets [strength]·13).</summary>
    public double[] ControlScales { get; set; } = Enumerable.Repeat(1.0, 13).ToArray();

    public ControlLDM(ControlLdmConfig? config = null, ClipTokenizer? tokenizer = null) : base(nameof(ControlLDM))
    {
        Config = config ?? ControlLdmConfig.Sd21;
        unet = new UNetModel(Config.Unet);
        vae = new AutoencoderKL(Config.Vae with { LatentScaleFactor = Config.LatentScaleFactor });
        clip = new FrozenOpenClipEmbedder(Config.Clip, tokenizer);
        controlnet = new ControlNet(Config.ControlNet, Config.Mode);
        RegisterComponents();
    }

    /// <summary>
    /// Loads a Stable Diffusion checkpoint as the official <c>load_pretrained_sd</c> does: for each of unet, vae and clip,
    /// every key of the module is looked up under its SD prefix; found keys are loaded, missing ones reported, and keys
    /// the modules do not use (EMA copies, schedules, the CLIP vision tower) returned as unused. Shapes must match.
    /// </summary>
    public (IReadOnlyList<string> Unused, IReadOnlyList<string> Missing) LoadPretrainedSd(IReadOnlyDictionary<string, Tensor> sd, string sourceName = "SD checkpoint")
    {
        var (components, unused) = SdCheckpointKeys.Split(sd);
        var missing = new List<string>();
        foreach (var (name, module) in new (string, nn.Module)[] { ("unet", unet), ("vae", vae), ("clip", clip) })
        {
            var report = StateDictLoader.Load(module, components[name], strict: false, sourceName: sourceName);
            var prefix = SdCheckpointKeys.Prefixes.First(p => p.Component == name).SdPrefix;
            missing.AddRange(report.Missing.Select(k => prefix + k));
            // Keys under a prefix that the module does not have (e.g. cond_stage_model.model.visual.*) are unused.
            unused.AddRange(report.Unexpected.Select(k => prefix + k));
        }
        return (unused, missing);
    }

    /// <summary>
    /// Loads all four components strictly from their own state dicts (ControlLDM-level keys split by component, as
    /// the fixtures and our own checkpoints store them); <paramref name="weightsOf"/> maps "unet", "vae", "clip",
    /// "controlnet" to a state dict.
    /// </summary>
    public void LoadComponents(Func<string, IReadOnlyDictionary<string, Tensor>> weightsOf, string sourceName = "weights")
    {
        foreach (var (name, module) in new (string, nn.Module)[] { ("unet", unet), ("vae", vae), ("clip", clip), ("controlnet", controlnet) })
            StateDictLoader.Load(module, weightsOf(name), strict: true, sourceName: $"{sourceName}.{name}");
    }

    /// <summary>Loads IRControlNet weights strictly (official <c>load_controlnet_from_ckpt</c>).</summary>
    public LoadReport LoadControlNet(IReadOnlyDictionary<string, Tensor> sd, string sourceName = "ControlNet checkpoint") =>
        StateDictLoader.Load(controlnet, sd, strict: true, sourceName: sourceName);

    /// <summary>Sets the attention implementation of UNet and ControlNet (the fixtures were made with vanilla attention).</summary>
    public AttentionMode AttentionMode
    {
        set { unet.AttentionMode = value; controlnet.AttentionMode = value; }
    }

    /// <summary>
    /// Image in [-1, 1] → latent: posterior mode (or a sample with <paramref name="noise"/>) × 0.18215. With
    /// <paramref name="tiled"/> the encoder runs as the official tiled VAE (<see cref="TiledVae"/>, tiles of
    /// <paramref name="tileSize"/> pixels; untiled when the image is no larger than a tile plus its padding).
    /// </summary>
    public Tensor VaeEncode(Tensor image, Tensor? noise = null, bool tiled = false, int tileSize = -1)
    {
        using var scope = torch.NewDisposeScope();
        using var posterior = tiled
            ? new DiagonalGaussianDistribution(vae.quant_conv_forward(new TiledVae(vae, isDecoder: false, tileSize).Forward(image)))
            : vae.Encode(image);
        return vae.ToDiffusionLatent(posterior, noise).MoveToOuterDisposeScope();
    }

    /// <summary>Latent → image in about [-1, 1]: decode(z / 0.18215); tiled with tiles of <paramref name="tileSize"/> latent pixels.</summary>
    public Tensor VaeDecode(Tensor z, bool tiled = false, int tileSize = -1)
    {
        // The decoder at full resolution is the peak of a run: give the heap back what earlier stages freed first
        // (not under autograd: guidance decodes at every step, where the heap is busy anyway).
        if (!torch.is_grad_enabled() && z.device_type == DeviceType.CPU) NativeHeap.ReleaseFreed();
        using var scope = torch.NewDisposeScope();
        if (!tiled) return vae.DecodeScaled(z).MoveToOuterDisposeScope();
        var h = vae.post_quant_conv_forward(vae.FromDiffusionLatent(z));
        return new TiledVae(vae, isDecoder: true, tileSize).Forward(h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The condition for a stage-1 output in [0, 1] and prompts (official <c>prepare_condition</c>): c_txt = CLIP of the
    /// prompts, c_img = VaeEncode(2·cond − 1) (mode, no sampling), optionally with the tiled encoder.
    /// </summary>
    public Conditioning PrepareCondition(Tensor condImage, IReadOnlyList<string> prompts, bool tiled = false, int tileSize = -1)
    {
        var cTxt = clip.Encode(prompts);
        using var scaled = condImage * 2 - 1;
        var cImg = VaeEncode(scaled, tiled: tiled, tileSize: tileSize);
        return new Conditioning(cTxt, cImg);
    }

    /// <summary>
    /// ε (or v) for x_t at t: the ControlNet sees x_t and c_img; its outputs, each times its control scale, are added
    /// into the UNet (official <c>ControlLDM.forward</c>). Conditioning.ControlScales overrides <see cref="ControlScales"/>.
    /// </summary>
    public Tensor Forward(Tensor x, Tensor t, Conditioning cond)
    {
        using var scope = torch.NewDisposeScope();
        t = t.to(x.device);   // samplers keep their timesteps on the CPU
        using var control = controlnet.forward(x, cond.CImage, t, cond.CText);
        using var scaled = control.Scaled(cond.ControlScales ?? ControlScales);
        return unet.forward(x, t, cond.CText, scaled).MoveToOuterDisposeScope();
    }

    /// <summary>Half or bfloat16 UNet and ControlNet as the official <c>cast_dtype</c> (GroupNorm stays float32).</summary>
    public void CastDtype(ScalarType dtype)
    {
        unet.CastDtype(dtype);
        controlnet.CastDtype(dtype);
    }
}

/// <summary>
/// The parameter-free diffusion module's state dict (official <c>Diffusion</c>): the float32 buffers
/// sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod (schema/diffusion*.json). Never loaded from a checkpoint.
/// </summary>
public sealed class DiffusionBuffers : nn.Module
{
    public DiffusionBuffers(NoiseSchedule schedule) : base("Diffusion")
    {
        var (sa, s1ma) = schedule.Buffers();
        register_buffer("sqrt_alphas_cumprod", sa);
        register_buffer("sqrt_one_minus_alphas_cumprod", s1ma);
    }
}
