{
  description = "nix-deploy: a NixOS fleet deployment coordinator";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        nix-deploy = pkgs.rustPlatform.buildRustPackage {
          pname = "nix-deploy";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
          src = pkgs.lib.cleanSource ./.;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ pkgs.makeWrapper ];
          # Integration tests need root and mount namespaces; they run in CI instead.
          doCheck = false;
          postInstall = ''
            wrapProgram $out/bin/nix-deploy --prefix PATH : ${pkgs.lib.makeBinPath [ pkgs.openssh pkgs.nix ]}
          '';
          meta.mainProgram = "nix-deploy";
        };
        default = nix-deploy;
      });

      # The `deployment.*` options for every host of a fleet, and
      # `services.nix-deploy` (the daemon) with this flake's package.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.nix-deploy.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.cargo pkgs.rustc pkgs.clippy pkgs.rustfmt pkgs.just pkgs.openssh ];
        };
      });
    };
}
