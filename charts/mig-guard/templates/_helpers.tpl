{{/* Names, labels and the small computed values every template shares. */}}

{{- define "mig-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mig-guard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "mig-guard.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "mig-guard.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mig-guard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mig-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "webhook"). */}}
{{- define "mig-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mig-guard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mig-guard.componentLabels" -}}
{{ include "mig-guard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mig-guard.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "mig-guard.webhookName" -}}{{ include "mig-guard.fullname" . }}-webhook{{- end -}}
{{- define "mig-guard.reconcilerName" -}}{{ include "mig-guard.fullname" . }}-reconciler{{- end -}}
{{- define "mig-guard.certsName" -}}{{ include "mig-guard.fullname" . }}-certs{{- end -}}
{{/* Name of both webhook configurations (Validating and Mutating are different kinds). */}}
{{- define "mig-guard.webhookConfigName" -}}{{ include "mig-guard.fullname" . }}{{- end -}}

{{- define "mig-guard.tlsSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "mig-guard.fullname" .)) .Values.certs.secretName -}}
{{- end -}}

{{- define "mig-guard.configMapName" -}}
{{- if .Values.migPartedConfig.name -}}
{{- .Values.migPartedConfig.name -}}
{{- else if eq .Values.migPartedConfig.mode "reference" -}}
default-mig-parted-config
{{- else -}}
{{- printf "%s-mig-parted-config" (include "mig-guard.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "mig-guard.configMapNamespace" -}}
{{- if eq .Values.migPartedConfig.mode "reference" -}}
{{- default "gpu-operator" .Values.migPartedConfig.namespace -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "mig-guard.configMapRef" -}}
{{ include "mig-guard.configMapNamespace" . }}/{{ include "mig-guard.configMapName" . }}
{{- end -}}

{{/* The identity that may change protected keys (nvidia.com/mig.config.state, mig-guard.io/*), each pod
only on its own node (its token names the node): the webhook and the node-writers policy check it. */}}
{{- define "mig-guard.reconcilerUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "mig-guard.reconcilerName" . }}
{{- end -}}

{{- define "mig-guard.certManagerCertificate" -}}{{ include "mig-guard.fullname" . }}-webhook{{- end -}}

{{/* Restricted container securityContext shared by the webhook and the certs Jobs. */}}
{{- define "mig-guard.restrictedContainerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "mig-guard.restrictedPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The Node webhooks' matchConditions and the node-writers policy: templates/_cel.tpl (generated). */}}

{{/* CEL for the ConfigMap guard: the watched ConfigMap deleted or its config key changed
(webhook/registration.py configmap_match_conditions()). The name comes from the object: a
collection delete sends no request.name. */}}
{{- define "mig-guard.configMapMatchConditions" -}}
{{- $key := printf "'%s'" .Values.migPartedConfig.key -}}
- name: watched-configmap
  expression: {{ printf "request.namespace == '%s' && (request.operation == 'DELETE' ? oldObject.metadata.name : object.metadata.name) == '%s'" (include "mig-guard.configMapNamespace" .) (include "mig-guard.configMapName" .) | quote }}
- name: config-key-changes
  expression: {{ printf "request.operation == 'DELETE' || (!has(object.data) || !has(oldObject.data) || !(%s in object.data) || !(%s in oldObject.data) || object.data[%s] != oldObject.data[%s])" $key $key $key $key | quote }}
{{- end -}}

{{/* The API server's addresses for the webhook's NetworkPolicy, comma-separated: the values, else
the `kubernetes` EndpointSlice in namespace default as the API server publishes it (nothing under
`helm template`, where lookup sees no cluster). */}}
{{- define "mig-guard.apiServerCIDRs" -}}
{{- $cidrs := .Values.webhook.networkPolicy.apiServerCIDRs -}}
{{- if not $cidrs -}}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" -}}
{{- range ($slice.endpoints | default list) -}}
{{- range .addresses -}}
{{- $cidrs = append $cidrs (printf "%s/%s" . (ternary "128" "32" (contains ":" .))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "," $cidrs -}}
{{- end -}}

{{- define "mig-guard.webhookClientConfig" -}}
service:
  name: {{ include "mig-guard.webhookName" .ctx }}
  namespace: {{ .ctx.Release.Namespace }}
  path: {{ .path }}
  port: 443
{{- end -}}

{{/* What `mig-guard certs` may do: its two Secrets, and the caBundle of the two webhook configurations. */}}
{{- define "mig-guard.certsNamespacedRules" -}}
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [{{ include "mig-guard.tlsSecretName" . | quote }}, {{ printf "%s-ca" (include "mig-guard.tlsSecretName" .) | quote }}]
  verbs: [get, update]
# `create` cannot be limited by resourceNames (the name is not known to the authorizer before
# the object exists), so the Job may create Secrets in this namespace.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
{{- end -}}

{{- define "mig-guard.certsClusterRules" -}}
- apiGroups: [admissionregistration.k8s.io]
  resources: [validatingwebhookconfigurations, mutatingwebhookconfigurations]
  resourceNames: [{{ include "mig-guard.webhookConfigName" . | quote }}]
  verbs: [get, patch]
{{- end -}}

{{/* The `mig-guard certs` container; pass (dict "ctx" $ "allowMissing" true/false). */}}
{{- define "mig-guard.certsContainer" -}}
{{- $v := .ctx.Values.certs -}}
name: certs
image: {{ include "mig-guard.image" .ctx }}
imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
args:
  - certs
  - --namespace={{ .ctx.Release.Namespace }}
  - --secret-name={{ include "mig-guard.tlsSecretName" .ctx }}
  - --service-name={{ include "mig-guard.webhookName" .ctx }}
  - --webhook-config={{ include "mig-guard.webhookConfigName" .ctx }}
  {{- if .allowMissing }}
  - --allow-missing-webhook-configs
  {{- end }}
  - --validity-days={{ $v.validityDays }}
  - --renew-before-days={{ $v.renewBeforeDays }}
  - --ca-validity-days={{ $v.caValidityDays }}
  - --ca-renew-before-days={{ $v.caRenewBeforeDays }}
  - --key-type={{ $v.keyType }}
  - --rsa-bits={{ $v.rsaBits }}
resources:
  {{- toYaml $v.jobResources | nindent 2 }}
securityContext:
  {{- include "mig-guard.restrictedContainerSecurityContext" .ctx | nindent 2 }}
{{- end -}}

{{- define "mig-guard.certsPodSpec" -}}
serviceAccountName: {{ .sa }}
restartPolicy: OnFailure
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "mig-guard.restrictedPodSecurityContext" .ctx | nindent 2 }}
containers:
  - {{- include "mig-guard.certsContainer" . | nindent 4 }}
{{- end -}}

{{/* Value combinations the schema cannot express. */}}
{{- define "mig-guard.validate" -}}
{{- if ge (int .Values.certs.renewBeforeDays) (int .Values.certs.validityDays) -}}
{{- fail "certs.renewBeforeDays must be smaller than certs.validityDays (or every run renews)" -}}
{{- end -}}
{{- if ge (int .Values.certs.caRenewBeforeDays) (int .Values.certs.caValidityDays) -}}
{{- fail "certs.caRenewBeforeDays must be smaller than certs.caValidityDays" -}}
{{- end -}}
{{- if and (eq .Values.reconciler.gpuBackend "simulated") (not .Values.reconciler.simulatedGpus) -}}
{{- fail "reconciler.gpuBackend=simulated needs reconciler.simulatedGpus, e.g. NVIDIA-A100-SXM4-40GB:1" -}}
{{- end -}}
{{- if and .Values.reconciler.simulatedGpus (ne .Values.reconciler.gpuBackend "simulated") -}}
{{- fail "reconciler.simulatedGpus is only used with reconciler.gpuBackend=simulated" -}}
{{- end -}}
{{- if and .Values.migPartedConfig.config (eq .Values.migPartedConfig.mode "reference") -}}
{{- fail "migPartedConfig.config is only used with migPartedConfig.mode=create" -}}
{{- end -}}
{{- end -}}
