using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// The encode stage: the stage-1 restoration I_RM (RGB in [0, 1]) and a prompt → the condition of the IRControlNet
/// (official <c>ControlLDM.prepare_condition</c>): the condition latent c_img = E(2·I_RM − 1)·0.18215 (VAE posterior
/// mode, no sampling) and the text embedding c_txt (OpenCLIP, penultimate layer). The negative condition of
/// classifier-free guidance shares c_img and differs in the text: <see cref="Negative"/>.
/// </summary>
public sealed class Encode
{
    public ControlLDM Model { get; }

    public Encode(ControlLDM model) => Model = model;

    /// <summary>c = (c_txt(prompt), c_img(I_RM)) for one prompt per image (the official default prompt is "").</summary>
    public Conditioning Apply(Tensor restored, string prompt = "")
    {
        using var _ = torch.no_grad();
        var prompts = Enumerable.Repeat(prompt, (int)restored.shape[0]).ToArray();
        return Model.PrepareCondition(restored, prompts);
    }

    /// <summary>c_img = E(2·I_RM − 1)·0.18215 (posterior mode).</summary>
    public Tensor Image(Tensor restored)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        return Model.VaeEncode(restored * 2 - 1).MoveToOuterDisposeScope();
    }

    /// <summary>c_txt of one prompt per batch element, [N, 77, ctx].</summary>
    public Tensor Text(string prompt, int batch = 1)
    {
        using var _ = torch.no_grad();
        return Model.clip.Encode(Enumerable.Repeat(prompt, batch).ToArray());
    }

    /// <summary>The negative condition c⁻ for classifier-free guidance: the same c_img with the negative prompt's text.</summary>
    public Conditioning Negative(Conditioning positive, string negativePrompt) =>
        positive with { CText = Text(negativePrompt, (int)positive.CImage.shape[0]) };

    /// <summary>The guidance target in the decoder's range: 2·I_RM − 1 (as the official run_stage2 loads it).</summary>
    public static Tensor Target(Tensor restored) => restored * 2 - 1;
}
