{{/* Names and labels shared by every object. */}}

{{- define "router-ext.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: 63 characters at most (DNS label), less room for "-router" etc. */}}
{{- define "router-ext.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The router StatefulSet and its headless Service share this name. 52 characters at most: the
StatefulSet controller labels its pods controller-revision-hash=<name>-<10-character hash>,
a 63-character label value.
*/}}
{{- define "router-ext.router" -}}{{ include "router-ext.fullname" . | trunc 45 | trimSuffix "-" }}-router{{- end }}
{{- define "router-ext.envoy" -}}{{ include "router-ext.fullname" . }}-envoy{{- end }}

{{- define "router-ext.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/name: {{ include "router-ext.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: router-ext
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "router-ext.selectorLabels" -}}
app.kubernetes.io/name: {{ include "router-ext.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "router-ext.routerSelectorLabels" -}}
{{ include "router-ext.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "router-ext.envoySelectorLabels" -}}
{{ include "router-ext.selectorLabels" . }}
app.kubernetes.io/component: envoy
{{- end }}

{{- define "router-ext.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "router-ext.router" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "router-ext.tokenSecret" -}}
{{- default (printf "%s-token" (include "router-ext.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "router-ext.discoveryNamespace" -}}
{{- default .Release.Namespace .Values.discovery.namespace }}
{{- end }}

{{- define "router-ext.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Where the router's files live inside its image (the Dockerfile's WORKDIR). */}}
{{- define "router-ext.configDir" -}}/etc/router-ext/config{{- end }}
{{- define "router-ext.configFile" -}}/etc/router-ext/config/router-ext.yaml{{- end }}
{{- define "router-ext.tokenDir" -}}/etc/router-ext/token{{- end }}
{{- define "router-ext.runDir" -}}/etc/router-ext/run{{- end }}

{{/*
The router config (router-ext.yaml): the user's `config`, with what the chart owns merged over
it. The same file is read by the router (serve) and by Envoy's init container (envoy-config),
so ports, the router's address and the token path cannot disagree between the two.
*/}}
{{- define "router-ext.config" -}}
{{- $d := .Values.discovery }}
{{- $k := dict "kind" $d.kind "watch_timeout_s" $d.watchTimeoutSeconds "backoff_max_s" $d.backoffMaxSeconds }}
{{- if $d.namespace }}{{- $_ := set $k "namespace" $d.namespace }}{{- end }}
{{- if eq $d.kind "endpointslices" }}
{{- $_ := set $k "service" (required "discovery.service is required for kind endpointslices" $d.service) }}
{{- if not (kindIs "invalid" $d.port) }}{{- $_ := set $k "port" $d.port }}{{- end }}
{{- else if eq $d.kind "pods" }}
{{- if not $d.selector }}{{- fail "discovery.selector is required for kind pods" }}{{- end }}
{{- $_ := set $k "selector" $d.selector }}
{{- $_ := set $k "target_port" (required "discovery.targetPort is required for kind pods" $d.targetPort | int) }}
{{- else if eq $d.kind "inferencepool" }}
{{- $_ := set $k "inference_pool" (default .Values.inferencePool.name $d.inferencePool) }}
{{- else }}
{{- fail (printf "discovery.kind %q: use endpointslices, pods or inferencepool" $d.kind) }}
{{- end }}
{{- $p := .Values.router.ports }}
{{- $metricsHost := ternary "0.0.0.0" "127.0.0.1" .Values.metrics.expose }}
{{- $router := include "router-ext.router" . }}
{{- $svcHost := printf "%s.%s.svc.%s" $router .Release.Namespace .Values.clusterDomain }}
{{- $routerAddr := printf "%s:%d" $svcHost ($p.grpc | int) }}
{{- /* Replica i of the StatefulSet answers DNS as <statefulset>-<i>.<headless service>...:
one ext_proc endpoint and one access logger per name in Envoy's bootstrap. */}}
{{- $replicas := include "router-ext.routerReplicas" . | int }}
{{- $routerAddrs := list }}
{{- range $i := until $replicas }}
{{- $routerAddrs = append $routerAddrs (printf "%s-%d.%s:%d" $router $i $svcHost ($p.grpc | int)) }}
{{- end }}
{{- $chart := dict
  "base_dir" "/etc/router-ext"
  "router" (dict
    "grpc" (dict "host" "0.0.0.0" "port" ($p.grpc | int))
    "metrics" (dict "host" $metricsHost "port" ($p.metrics | int))
    "admin" (dict "host" "127.0.0.1" "port" ($p.admin | int))
    "auth" (dict "mode" .Values.auth.mode "token_file" (printf "%s/token" (include "router-ext.tokenDir" .)))
    "drain_seconds" .Values.router.drainSeconds
    "workers" 1)
  "discovery" (dict "source" "kubernetes" "kubernetes" $k)
  "envoy" (dict
    "eds" "grpc"
    "listener" (dict "host" "0.0.0.0" "port" (.Values.envoy.listenerPort | int))
    "admin" (dict "host" "127.0.0.1" "port" (.Values.envoy.adminPort | int))
    "router_address" $routerAddr
    "router_addresses" $routerAddrs
    "access_log_path" "/dev/stdout")
}}
{{- $merged := mergeOverwrite (deepCopy .Values.config) $chart }}
{{- toYaml $merged }}
{{- end }}

{{/* router.replicas, checked: 1 to 64 (envoy.router_addresses holds at most 64). */}}
{{- define "router-ext.routerReplicas" -}}
{{- $n := .Values.router.replicas | int }}
{{- if or (lt $n 1) (gt $n 64) }}
{{- fail (printf "router.replicas %v: use 1 to 64 (Envoy gets one access logger per replica)" .Values.router.replicas) }}
{{- end }}
{{- $n }}
{{- end }}

{{/*
The router pods' config checksum: the config without envoy.router_addresses, which only
Envoy's bootstrap reads, so scaling the routers rolls Envoy but not the running routers.
*/}}
{{- define "router-ext.routerConfigChecksum" -}}
{{- $c := include "router-ext.config" . | fromYaml }}
{{- $_ := unset $c.envoy "router_addresses" }}
{{- toYaml $c | sha256sum }}
{{- end }}

{{/* terminationGracePeriodSeconds of the router: preStop + drain + margin, whole seconds. */}}
{{- define "router-ext.routerGrace" -}}
{{- add (ceil .Values.router.preStopSleepSeconds) (ceil .Values.router.drainSeconds) (ceil .Values.router.terminationMarginSeconds) | int }}
{{- end }}

{{/* Default anti-affinity: prefer one replica per node. */}}
{{- define "router-ext.spread" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- .labels | nindent 12 }}
{{- end }}
